//! btrfs quota groups: how the local lane enforces a volume's capacity on btrfs.
//!
//! Each volume's data directory is a subvolume, and the subvolume's level-0 quota group gets a
//! limit on referenced bytes equal to the volume's capacity: writes past it fail with EDQUOT.
//! Expansion raises the limit; the volume's usage is read back from the quota tree (what the
//! volume itself references, not the filesystem's free space); a deleted volume's subvolume is
//! destroyed whole. Everything goes through the btrfs ioctls, no `btrfs` process per call.
//! Quotas must be enabled on the filesystem (`btrfs quota enable <mountpoint>`): Lanes does
//! not switch them on for the whole filesystem by itself.

use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;

/// `statfs` magic of btrfs.
pub const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
const MAGIC: u8 = 0x94;
/// Every subvolume's root directory has this inode number.
const SUBVOLUME_ROOT_INODE: u64 = 256;
const QUOTA_TREE: u64 = 8;
const QGROUP_STATUS_KEY: u32 = 240;
const QGROUP_INFO_KEY: u32 = 242;
const QGROUP_STATUS_FLAG_ON: u64 = 1;
const LIMIT_MAX_RFER: u64 = 1;

#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}

#[repr(C)]
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; 4080],
}

#[repr(C)]
#[derive(Default)]
struct QgroupLimitArgs {
    qgroupid: u64,
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

#[repr(C)]
struct SearchArgs {
    tree_id: u64,
    min_objectid: u64,
    max_objectid: u64,
    min_offset: u64,
    max_offset: u64,
    min_transid: u64,
    max_transid: u64,
    min_type: u32,
    max_type: u32,
    nr_items: u32,
    unused: u32,
    unused_tail: [u64; 4],
    buf: [u8; 3992],
}

/// `struct btrfs_ioctl_vol_args_v2`, for snapshots.
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; 4040],
}

const SUBVOL_RDONLY: u64 = 1 << 1;

nix::ioctl_write_ptr!(subvol_create, MAGIC, 14, VolArgs);
nix::ioctl_write_ptr!(snap_create_v2, MAGIC, 23, VolArgsV2);
nix::ioctl_write_ptr!(snap_destroy, MAGIC, 15, VolArgs);
nix::ioctl_readwrite!(tree_search, MAGIC, 17, SearchArgs);
nix::ioctl_readwrite!(ino_lookup, MAGIC, 18, InoLookupArgs);
// The kernel declares QGROUP_LIMIT with _IOR although the data flows in.
nix::ioctl_read!(qgroup_limit, MAGIC, 43, QgroupLimitArgs);

/// Opens the root directory of a subvolume; anything else is refused (a quota-group call on a
/// plain directory would act on the subvolume around it, possibly the whole filesystem).
fn open_subvolume(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::MetadataExt;
    let dir = open_dir(path)?;
    if dir.metadata()?.ino() != SUBVOLUME_ROOT_INODE {
        return Err(std::io::Error::other(format!(
            "{} is not a btrfs subvolume",
            path.display()
        )));
    }
    Ok(dir)
}

fn open_dir(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
}

fn vol_args(name: &OsStr) -> std::io::Result<VolArgs> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= 4088 || bytes.contains(&b'/') || bytes.contains(&0) {
        return Err(std::io::Error::other("not a subvolume name"));
    }
    let mut args = VolArgs {
        fd: 0,
        name: [0; 4088],
    };
    args.name[..bytes.len()].copy_from_slice(bytes);
    Ok(args)
}

/// True when `path` is on btrfs.
pub fn is_btrfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BTRFS_SUPER_MAGIC)
}

/// True when quota groups are enabled on the btrfs filesystem holding `path`.
pub fn quotas_enabled(path: &Path) -> std::io::Result<bool> {
    let dir = open_dir(path)?;
    match search_quota_tree(&dir, QGROUP_STATUS_KEY, 0) {
        Ok(Some(item)) => {
            Ok(le_u64(&item, 16).is_some_and(|flags| flags & QGROUP_STATUS_FLAG_ON != 0))
        }
        Ok(None) | Err(Errno::ENOENT) => Ok(false),
        Err(errno) => Err(errno.into()),
    }
}

/// Creates subvolume `name` in the directory `parent`.
pub fn create_subvolume(parent: &Path, name: &OsStr) -> std::io::Result<()> {
    let dir = open_dir(parent)?;
    let args = vol_args(name)?;
    // SAFETY: `args` is a valid, initialised btrfs_ioctl_vol_args the kernel only reads, and
    // `dir` is an open directory for the duration of the call.
    unsafe { subvol_create(dir.as_raw_fd(), &args) }?;
    Ok(())
}

/// Makes `name` in `parent` a snapshot of the subvolume at `source` (read-only when asked):
/// O(1), sharing every extent with its source until either side writes.
pub fn snapshot_subvolume(
    source: &Path,
    parent: &Path,
    name: &OsStr,
    read_only: bool,
) -> std::io::Result<()> {
    let from = open_subvolume(source)?;
    let dir = open_dir(parent)?;
    let short = vol_args(name)?;
    if name.as_bytes().len() >= 4040 {
        return Err(std::io::Error::other("not a subvolume name"));
    }
    let mut args = VolArgsV2 {
        fd: from.as_raw_fd() as i64,
        transid: 0,
        flags: if read_only { SUBVOL_RDONLY } else { 0 },
        unused: [0; 4],
        name: [0; 4040],
    };
    args.name[..name.as_bytes().len()].copy_from_slice(&short.name[..name.as_bytes().len()]);
    // SAFETY: `args` is a valid btrfs_ioctl_vol_args_v2 the kernel only reads; `from` and
    // `dir` are open for the duration of the call.
    unsafe { snap_create_v2(dir.as_raw_fd(), &args) }?;
    Ok(())
}

/// Destroys subvolume `name` in `parent`, whatever it holds (the kernel frees it in the
/// background).
pub fn destroy_subvolume(parent: &Path, name: &OsStr) -> std::io::Result<()> {
    let dir = open_dir(parent)?;
    let args = vol_args(name)?;
    // SAFETY: as in `create_subvolume`.
    unsafe { snap_destroy(dir.as_raw_fd(), &args) }?;
    Ok(())
}

/// True when `path` is the root of a subvolume.
pub fn is_subvolume(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && m.ino() == SUBVOLUME_ROOT_INODE)
        && is_btrfs(path)
}

/// Limits the referenced bytes of the subvolume at `subvolume` to `bytes`.
pub fn set_limit(subvolume: &Path, bytes: u64) -> std::io::Result<()> {
    let dir = open_subvolume(subvolume)?;
    let mut args = QgroupLimitArgs {
        // 0: the quota group of the subvolume `dir` is in.
        qgroupid: 0,
        flags: LIMIT_MAX_RFER,
        max_rfer: bytes,
        ..Default::default()
    };
    // SAFETY: `args` is a valid btrfs_ioctl_qgroup_limit_args; `dir` is open.
    unsafe { qgroup_limit(dir.as_raw_fd(), &mut args) }?;
    Ok(())
}

/// Bytes the subvolume at `subvolume` references now (as of the last transaction commit).
pub fn usage(subvolume: &Path) -> std::io::Result<u64> {
    let dir = open_subvolume(subvolume)?;
    let mut lookup = InoLookupArgs {
        treeid: 0,
        objectid: SUBVOLUME_ROOT_INODE,
        name: [0; 4080],
    };
    // SAFETY: `lookup` is a valid btrfs_ioctl_ino_lookup_args the kernel reads and fills.
    unsafe { ino_lookup(dir.as_raw_fd(), &mut lookup) }?;
    let item = search_quota_tree(&dir, QGROUP_INFO_KEY, lookup.treeid)?
        .ok_or_else(|| std::io::Error::other("the subvolume has no quota group"))?;
    le_u64(&item, 8).ok_or_else(|| std::io::Error::other("short quota group item"))
}

/// The item of `kind` at `offset` in the quota tree (objectid 0), if there is one.
fn search_quota_tree(
    dir: &std::fs::File,
    kind: u32,
    offset: u64,
) -> Result<Option<Vec<u8>>, Errno> {
    let mut args = SearchArgs {
        tree_id: QUOTA_TREE,
        min_objectid: 0,
        max_objectid: 0,
        min_offset: offset,
        max_offset: offset,
        min_transid: 0,
        max_transid: u64::MAX,
        min_type: kind,
        max_type: kind,
        nr_items: 1,
        unused: 0,
        unused_tail: [0; 4],
        buf: [0; 3992],
    };
    // SAFETY: `args` is a valid btrfs_ioctl_search_args; the kernel writes at most its buffer.
    unsafe { tree_search(dir.as_raw_fd(), &mut args) }?;
    if args.nr_items == 0 {
        return Ok(None);
    }
    // A search header (transid, objectid, offset: u64; type, len: u32), then the item.
    let header = &args.buf[..32];
    let kind_found = u32::from_ne_bytes(header[24..28].try_into().unwrap_or_default());
    let len = u32::from_ne_bytes(header[28..32].try_into().unwrap_or_default()) as usize;
    if kind_found != kind || 32 + len > args.buf.len() {
        return Ok(None);
    }
    Ok(Some(args.buf[32..32 + len].to_vec()))
}

fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}
