//! Parses `/proc/self/mountinfo`, the only source of truth for what is mounted where.
//!
//! Lanes never remembers mounts in memory: every node call reads this table, so a restarted
//! plugin sees exactly what the kernel sees.

use std::path::{Path, PathBuf};

/// One line of mountinfo: a mount point and what is mounted there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Device numbers of the mounted filesystem.
    pub major: u32,
    pub minor: u32,
    /// The directory of the source filesystem that appears at `mount_point` (bind mounts).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `nosuid`, ...).
    pub options: Vec<String>,
    pub fs_type: String,
    pub source: String,
    /// Per-superblock options (`prjquota`, ...).
    pub super_options: Vec<String>,
}

impl MountEntry {
    /// True when this mount is read-only.
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }

    /// True when the per-mount option `name` is set.
    pub fn has_option(&self, name: &str) -> bool {
        self.options.iter().any(|o| o == name)
    }
}

/// Reads and parses the mount table of this process's mount namespace.
pub fn read() -> std::io::Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse(&text))
}

/// Parses mountinfo text; malformed lines are skipped rather than trusted.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

/// Reads only the entries mounted at one of `paths` or at one of their ancestors: what a node
/// call needs, without building the whole table (nodes carry thousands of mounts).
pub fn read_for(paths: &[&Path]) -> std::io::Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_for(&text, paths))
}

/// [`parse`], keeping only entries at or above one of `paths`.
pub fn parse_for(text: &str, paths: &[&Path]) -> Vec<MountEntry> {
    parse_where(text, |_, point| {
        paths.iter().any(|path| path.starts_with(point))
    })
}

/// [`parse`], keeping only the lines whose (root, mount point) pass `keep`; the other lines
/// are never fully parsed.
pub fn parse_where(text: &str, keep: impl Fn(&Path, &Path) -> bool) -> Vec<MountEntry> {
    text.lines()
        .filter(|line| {
            let mut fields = line.split(' ').skip(3);
            match (fields.next(), fields.next()) {
                (Some(root), Some(point)) => {
                    keep(Path::new(&unescape(root)), Path::new(&unescape(point)))
                }
                _ => false,
            }
        })
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (head, tail) = line.split_once(" - ")?;
    let fields: Vec<&str> = head.split(' ').collect();
    if fields.len() < 6 {
        return None;
    }
    let (major, minor) = fields[2].split_once(':')?;
    let mut tail = tail.split(' ');
    let fs_type = tail.next()?;
    let source = tail.next()?;
    let super_options = tail.next().unwrap_or("");
    Some(MountEntry {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root: PathBuf::from(unescape(fields[3])),
        mount_point: PathBuf::from(unescape(fields[4])),
        options: fields[5].split(',').map(str::to_owned).collect(),
        fs_type: unescape(fs_type),
        source: unescape(source),
        super_options: super_options.split(',').map(str::to_owned).collect(),
    })
}

/// Undoes the kernel's octal escapes (`\040` for space, `\011` tab, `\012` newline, `\134` `\`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && let Some(value) = octal(&bytes[i + 1..i + 4])
        {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn octal(digits: &[u8]) -> Option<u8> {
    let text = std::str::from_utf8(digits).ok()?;
    u8::from_str_radix(text, 8).ok()
}

/// The entries mounted exactly at `path`, oldest first (the last one is what a reader sees).
pub fn at<'a>(table: &'a [MountEntry], path: &Path) -> Vec<&'a MountEntry> {
    table.iter().filter(|e| e.mount_point == path).collect()
}

/// The mount that contains `path`: the entry with the longest mount point that is a prefix.
pub fn containing<'a>(table: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    table
        .iter()
        .filter(|e| path.starts_with(&e.mount_point))
        .max_by_key(|e| e.mount_point.as_os_str().len())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
35 22 0:30 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
90 22 253:0 /var/lib/lanes/volumes/a/data /mnt/with\\040space ro,relatime shared:1 - ext4 /dev/vda rw
91 22 7:0 / /var/lib/lanes rw,relatime - xfs /dev/loop0 rw,attr2,inode64,prjquota
garbage line
";

    #[test]
    fn parses_fields_and_unescapes() {
        let table = parse(SAMPLE);
        assert_eq!(table.len(), 4);
        let bind = &table[2];
        assert_eq!(bind.mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(bind.root, PathBuf::from("/var/lib/lanes/volumes/a/data"));
        assert_eq!((bind.major, bind.minor), (253, 0));
        assert!(bind.read_only());
        assert_eq!(bind.fs_type, "ext4");
        assert!(!table[0].read_only());
        assert!(table[3].super_options.iter().any(|o| o == "prjquota"));
    }

    #[test]
    fn finds_mounts_at_and_containing_a_path() {
        let table = parse(SAMPLE);
        assert_eq!(at(&table, Path::new("/mnt/with space")).len(), 1);
        assert!(at(&table, Path::new("/mnt")).is_empty());
        let owner = containing(&table, Path::new("/var/lib/lanes/volumes/x")).unwrap();
        assert_eq!(owner.fs_type, "xfs");
        let root = containing(&table, Path::new("/etc")).unwrap();
        assert_eq!(root.mount_point, PathBuf::from("/"));
    }

    #[test]
    fn filtered_parse_keeps_only_paths_and_ancestors() {
        let kept = parse_for(
            SAMPLE,
            &[Path::new("/mnt/with space"), Path::new("/var/lib/lanes/v")],
        );
        let points: Vec<_> = kept.iter().map(|e| e.mount_point.clone()).collect();
        assert_eq!(
            points,
            vec![
                PathBuf::from("/"),
                PathBuf::from("/mnt/with space"),
                PathBuf::from("/var/lib/lanes")
            ]
        );
    }

    #[test]
    fn unescape_leaves_plain_backslashes() {
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("tail\\"), "tail\\");
        assert_eq!(unescape("x\\09"), "x\\09");
    }
}
