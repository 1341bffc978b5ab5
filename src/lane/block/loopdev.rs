//! Loop devices over disk images, through the kernel's ioctls (no `losetup` process).
//!
//! Rule: the device of an image is always found again from the image itself (the device and
//! inode the kernel reports for each bound loop device), never remembered, so a restarted
//! plugin finds what a killed one attached and a retry never attaches a second device.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const LOOP_CONTROL: &str = "/dev/loop-control";
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    size_limit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; LO_NAME_SIZE],
    crypt_name: [u8; LO_NAME_SIZE],
    encrypt_key: [u8; LO_KEY_SIZE],
    init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>` (LOOP_CONFIGURE, Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

impl LoopInfo64 {
    fn zeroed() -> LoopInfo64 {
        LoopInfo64 {
            device: 0,
            inode: 0,
            rdevice: 0,
            offset: 0,
            size_limit: 0,
            number: 0,
            encrypt_type: 0,
            encrypt_key_size: 0,
            flags: 0,
            file_name: [0; LO_NAME_SIZE],
            crypt_name: [0; LO_NAME_SIZE],
            encrypt_key: [0; LO_KEY_SIZE],
            init: [0; 2],
        }
    }
}

nix::ioctl_none_bad!(loop_ctl_get_free, 0x4C82);
nix::ioctl_write_ptr_bad!(loop_configure, 0x4C0A, LoopConfig);
nix::ioctl_read_bad!(loop_get_status64, 0x4C05, LoopInfo64);
nix::ioctl_none_bad!(loop_clr_fd, 0x4C01);
nix::ioctl_none_bad!(loop_set_capacity, 0x4C07);

/// A bound loop device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
    /// The device number (major, minor): what the mount table shows for a filesystem on it.
    pub number: (u32, u32),
}

fn io_context(what: String) -> impl FnOnce(std::io::Error) -> std::io::Error {
    move |e| std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn errno(what: String) -> impl FnOnce(nix::errno::Errno) -> std::io::Error {
    move |e| std::io::Error::new(std::io::Error::from(e).kind(), format!("{what}: {e}"))
}

impl LoopDevice {
    fn at(path: PathBuf) -> std::io::Result<LoopDevice> {
        let meta =
            std::fs::metadata(&path).map_err(io_context(format!("stat {}", path.display())))?;
        if !meta.file_type().is_block_device() {
            return Err(std::io::Error::other(format!(
                "{} is not a block device",
                path.display()
            )));
        }
        let rdev = meta.rdev();
        Ok(LoopDevice {
            path,
            number: (
                nix::sys::stat::major(rdev) as u32,
                nix::sys::stat::minor(rdev) as u32,
            ),
        })
    }

    /// The device's size in bytes as the kernel sees it now.
    pub fn size(&self) -> std::io::Result<u64> {
        let name = self.path.file_name().unwrap_or_default().to_string_lossy();
        let sectors = std::fs::read_to_string(format!("/sys/block/{name}/size")).map_err(
            io_context(format!("read the size of {}", self.path.display())),
        )?;
        Ok(sectors.trim().parse::<u64>().unwrap_or(0) * 512)
    }

    /// Makes the device take the image's current size (after the image grew).
    pub fn refresh_capacity(&self) -> std::io::Result<()> {
        let device =
            File::open(&self.path).map_err(io_context(format!("open {}", self.path.display())))?;
        // SAFETY: LOOP_SET_CAPACITY takes no argument; the descriptor is a loop device.
        unsafe { loop_set_capacity(device.as_raw_fd()) }
            .map_err(errno(format!("resize {}", self.path.display())))?;
        Ok(())
    }

    /// Unbinds the device from its image. A device still mounted is unbound by the kernel
    /// when its last user goes.
    pub fn detach(&self) -> std::io::Result<()> {
        let device =
            File::open(&self.path).map_err(io_context(format!("open {}", self.path.display())))?;
        // SAFETY: LOOP_CLR_FD takes no argument; the descriptor is a loop device.
        match unsafe { loop_clr_fd(device.as_raw_fd()) } {
            Ok(_) | Err(nix::errno::Errno::ENXIO) => Ok(()),
            Err(e) => Err(errno(format!("detach {}", self.path.display()))(e)),
        }
    }
}

/// The loop device bound to `image`, if any: sysfs names each bound device's backing file
/// (visible even where `/dev` is not, as in an unprivileged controller); where the device node
/// can be opened, the kernel's device and inode of the backing file must match too.
pub fn find(image: &Path) -> std::io::Result<Option<LoopDevice>> {
    let meta = std::fs::metadata(image).map_err(io_context(format!("stat {}", image.display())))?;
    let image = image
        .canonicalize()
        .map_err(io_context(format!("resolve {}", image.display())))?;
    let entries = std::fs::read_dir("/sys/block").map_err(io_context("list /sys/block".into()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        // Only bound devices have a backing file.
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        if Path::new(backing.trim_end_matches('\n')) != image {
            continue;
        }
        let path = PathBuf::from("/dev").join(&name);
        let Ok(device) = File::open(&path) else {
            let number = std::fs::read_to_string(entry.path().join("dev")).unwrap_or_default();
            let (major, minor) = number.trim().split_once(':').unwrap_or(("7", "0"));
            return Ok(Some(LoopDevice {
                path,
                number: (major.parse().unwrap_or(7), minor.parse().unwrap_or(0)),
            }));
        };
        let mut info = LoopInfo64::zeroed();
        // SAFETY: `info` is a valid, writable loop_info64 for the kernel to fill.
        if unsafe { loop_get_status64(device.as_raw_fd(), &mut info) }.is_ok()
            && info.device == meta.dev()
            && info.inode == meta.ino()
        {
            return LoopDevice::at(path).map(Some);
        }
    }
    Ok(None)
}

/// The loop device of `image`: the one already bound to it, or a free one bound now with
/// direct I/O (page cache only once, in the filesystem on the device).
pub fn attach(image: &Path) -> std::io::Result<LoopDevice> {
    if let Some(device) = find(image)? {
        return Ok(device);
    }
    let backing = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open(image)
        .map_err(io_context(format!("open {}", image.display())))?;
    let control = File::open(LOOP_CONTROL).map_err(io_context(format!("open {LOOP_CONTROL}")))?;
    // Another process may take the free device first: then ask again.
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let number = unsafe { loop_ctl_get_free(control.as_raw_fd()) }
            .map_err(errno("find a free loop device".into()))?;
        let path = PathBuf::from(format!("/dev/loop{number}"));
        let device = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(device) => device,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_context(format!("open {}", path.display()))(e)),
        };
        let mut config = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: 0,
            info: LoopInfo64::zeroed(),
            reserved: [0; 8],
        };
        config.info.flags = LO_FLAGS_DIRECT_IO;
        let name = image.as_os_str().as_encoded_bytes();
        let len = name.len().min(LO_NAME_SIZE - 1);
        config.info.file_name[..len].copy_from_slice(&name[..len]);
        // SAFETY: `config` is a valid loop_config whose fd is open for the call's duration.
        match unsafe { loop_configure(device.as_raw_fd(), &config) } {
            Ok(_) => return LoopDevice::at(path),
            Err(nix::errno::Errno::EBUSY) => continue,
            Err(e) => {
                return Err(errno(format!(
                    "bind {} to {}",
                    image.display(),
                    path.display()
                ))(e));
            }
        }
    }
    Err(std::io::Error::other(
        "no free loop device could be bound after 16 tries; other processes are taking them",
    ))
}
