//! The `lanes` command line as a person or a log pipeline meets it: completion scripts, JSON
//! logs, error lines that say each cause once, Kubernetes quantities.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn lanes() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lanes"));
    command
        .env_remove("LANES_LOG_FORMAT")
        .env_remove("LANES_CONFIG");
    command
}

#[test]
fn completion_scripts_are_printed_for_each_shell() {
    for (shell, marker) in [
        ("bash", "_lanes()"),
        ("zsh", "#compdef lanes"),
        ("fish", "complete -c lanes"),
    ] {
        let out = lanes().args(["completion", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains(marker) && script.contains("profiles"),
            "{shell}: {script:.200}"
        );
    }
    let out = lanes().args(["completion", "tcsh"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values"));
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let child = lanes()
        .args([
            "--log-format",
            "json",
            "standalone",
            "--node-id",
            "cli-test",
            "--endpoint",
        ])
        .arg(&socket)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("LANES_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "plugin did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            value["level"].is_string() && value["fields"].is_object(),
            "{line}"
        );
    }
    assert!(text.contains("serving CSI"), "{text}");
    assert!(!text.contains('\u{1b}'), "no colour codes in JSON logs");
}

#[test]
fn errors_say_each_cause_once() {
    let out = lanes()
        .args(["csi", "--endpoint", "/proc/no-such-dir/csi.sock", "info"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("is the plugin running?"), "{text}");
    assert_eq!(text.matches("os error 2").count(), 1, "{text}");
}

#[test]
fn capacities_take_kubernetes_quantities() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lanes.yaml");
    std::fs::write(
        &config,
        "local:\n  default_capacity: 1.5Gi\n  max_capacity: 2e12\n",
    )
    .unwrap();
    let out = lanes()
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["profiles", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&config, "local:\n  default_capacity: 1.5.0Gi\n").unwrap();
    let out = lanes()
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["profiles"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a size"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_node_plugin_without_root_says_so_at_start() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = dir.path().join("csi.sock");
    let mut command = lanes();
    command
        .args(["node", "--node-id", "cli-test", "--endpoint"])
        .arg(&socket)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("LANES_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if nix::unistd::geteuid().is_root() {
        // SAFETY: setuid only, between fork and exec.
        unsafe {
            command.pre_exec(|| {
                nix::unistd::setgid(nix::unistd::Gid::from_raw(65534))?;
                nix::unistd::setuid(nix::unistd::Uid::from_raw(65534))?;
                Ok(())
            });
        }
    }
    let child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "plugin did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("not running as root"), "{text}");
}

#[test]
fn every_command_and_argument_says_what_it_is() {
    fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
        let path = format!("{path} {}", command.get_name());
        if command.get_about().is_none() && path != " lanes" {
            missing.push(format!("{path}: no description"));
        }
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{path} <{id}>"));
            }
        }
        for sub in command.get_subcommands() {
            if sub.get_name() != "help" {
                walk(sub, &path, missing);
            }
        }
    }
    let mut missing = Vec::new();
    walk(
        &<lanes::cli::Cli as clap::CommandFactory>::command(),
        "",
        &mut missing,
    );
    assert!(
        missing.is_empty(),
        "{} without help:\n{}",
        missing.len(),
        missing.join("\n")
    );
}

#[test]
fn copy_refuses_the_flags_it_has_no_use_for() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a"), b"a").unwrap();
    let dst = dir.path().join("dst");
    for args in [
        vec!["copy", "--data-dir", "/var/lib/lanes"],
        vec!["--config", "/etc/lanes.yaml", "copy"],
    ] {
        let out = lanes().args(&args).arg(&src).arg(&dst).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("`lanes copy` takes no --"), "{stderr}");
        assert!(!dst.exists(), "{args:?}: refused before copying");
    }
    // The environment is not the command line: a container's LANES_DATA_DIR is fine.
    let out = lanes()
        .env("LANES_DATA_DIR", "/var/lib/lanes")
        .arg("copy")
        .arg(&src)
        .arg(&dst)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(dst.join("a")).unwrap(), b"a");
}
