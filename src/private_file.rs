//! Files only the proxy's user may read, replaced atomically: grants and
//! the self-made CA's keys; and the checks that such a file or its folder
//! is the proxy's own.
//!
//! A write goes to a temporary file with mode 0600 beside the target, is
//! fsynced, renamed over the target, and the directory is fsynced, so a
//! crash at any moment leaves either the old file or the new one, never
//! neither and never half of one.
//!
//! Another local user must not be able to hand the proxy a file: a grant
//! they wrote would make the proxy use their refresh token, and a symbolic
//! link they planted would make the proxy (perhaps root) write where the
//! link points. So files are opened without following a link
//! ([`no_follow`]), and [`Exposure`] names why a file or folder that
//! someone else owns or may write is refused.

use std::io::Write;
use std::path::Path;

/// Creates `dir` (and parents) readable by the owner only.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Replaces `path` with `bytes`, atomically, mode 0600. The directory must
/// exist.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id(),
        rand::random::<u32>()
    ));
    let written = (|| {
        let mut file = private_file_options().open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Removes the temporaries that [`write_atomically`] left in `dir` when its
/// process was killed between creating one and renaming it (each holds a
/// whole copy of what was being written, a grant included). A temporary of
/// a process still running (another `xoauth2-proxy login`, say) is left
/// alone. Returns how many were removed.
pub fn remove_stale_temporaries(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name();
            temporary_writer(&name.to_string_lossy()).is_some_and(|pid| !process_runs(pid))
        })
        .filter(|entry| std::fs::remove_file(entry.path()).is_ok())
        .count()
}

/// The process id in a temporary's name, `.NAME.PID.RANDOM.tmp`.
fn temporary_writer(name: &str) -> Option<u32> {
    let inner = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let mut parts = inner.rsplitn(3, '.');
    let _random: u32 = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    parts.next().filter(|target| !target.is_empty())?;
    Some(pid)
}

/// Whether process `pid` still runs (unknown: assume it does).
fn process_runs(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// Writes `bytes` to a new file at `path`, mode 0600; an existing file (or
/// link) is never replaced: the error's kind is then `AlreadyExists`.
pub fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = private_file_options().open(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Makes `options` refuse to open a symbolic link (the last part of the
/// path): the open fails, and [`is_link_refusal`] says why.
pub fn no_follow(options: &mut std::fs::OpenOptions) -> &mut std::fs::OpenOptions {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW);
    }
    options
}

/// The open failed because the path is a symbolic link ([`no_follow`]).
pub fn is_link_refusal(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    {
        e.raw_os_error() == Some(libc::ELOOP)
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

/// Why a file or folder of the proxy's state is refused: someone other than
/// the proxy's user could have written it, or could change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    /// A symbolic link where a file must be.
    Link,
    /// Another user owns it.
    ForeignOwner { uid: u32, me: u32 },
    /// Users other than its owner may write to it: others, or a group that
    /// is not the proxy's own.
    Writable { mode: u32, dir: bool },
}

/// Whether a grant or lock file (by its metadata, not following a link) is
/// exposed: it must belong to the proxy's user, and only that user (or the
/// proxy's own group) may write it.
pub fn file_exposure(meta: &std::fs::Metadata) -> Option<Exposure> {
    if meta.file_type().is_symlink() {
        return Some(Exposure::Link);
    }
    owner_and_mode(meta).and_then(|m| exposure_of(m, false))
}

/// Whether a folder of the state is exposed: as for a file, except that
/// root may own it (a mounted volume's root often is root's).
///
/// For both, a group may write only if it is the proxy's own group:
/// Kubernetes' `fsGroup` makes a volume writable for the pod's group, which
/// is the proxy's; on a host, a user's own group is that user's alone.
pub fn dir_exposure(meta: &std::fs::Metadata) -> Option<Exposure> {
    owner_and_mode(meta).and_then(|m| exposure_of(m, true))
}

/// The mode of a file (by its metadata) that users other than its owner and
/// the proxy's own group may read; `None` when no one else may.
pub fn others_may_read(meta: &std::fs::Metadata) -> Option<u32> {
    owner_and_mode(meta).and_then(readable_by_others)
}

fn readable_by_others(o: Ownership) -> Option<u32> {
    let group_reads = o.mode & 0o040 != 0 && o.gid != o.my_gid;
    (group_reads || o.mode & 0o004 != 0).then_some(o.mode)
}

/// A file's or folder's owner and mode, beside the proxy's own user and group.
#[derive(Debug, Clone, Copy)]
struct Ownership {
    uid: u32,
    gid: u32,
    mode: u32,
    my_uid: u32,
    my_gid: u32,
}

#[cfg(unix)]
fn owner_and_mode(meta: &std::fs::Metadata) -> Option<Ownership> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid and getegid cannot fail and touch no memory of ours.
    let (my_uid, my_gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    Some(Ownership {
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.mode() & 0o7777,
        my_uid,
        my_gid,
    })
}

#[cfg(not(unix))]
fn owner_and_mode(_meta: &std::fs::Metadata) -> Option<Ownership> {
    None
}

fn exposure_of(o: Ownership, dir: bool) -> Option<Exposure> {
    let owner_ok = o.uid == o.my_uid || (dir && o.uid == 0);
    if !owner_ok {
        return Some(Exposure::ForeignOwner {
            uid: o.uid,
            me: o.my_uid,
        });
    }
    let group_writes = o.mode & 0o020 != 0 && o.gid != o.my_gid;
    let others_write = o.mode & 0o002 != 0;
    (group_writes || others_write).then_some(Exposure::Writable { mode: o.mode, dir })
}

impl Exposure {
    /// The sentence for the user: `what` (e.g. "token file") and `path`
    /// named, and the command that fixes it.
    pub fn sentence(&self, what: &str, path: &Path) -> String {
        let p = path.display();
        match *self {
            Exposure::Link => format!(
                "{what} {p} is a symbolic link, which the proxy does not follow (it could make the proxy read or write another file); remove it with `rm {p}`"
            ),
            Exposure::ForeignOwner { uid, me } => format!(
                "{what} {p} belongs to uid {uid}, not to uid {me} that the proxy runs as, so another user may have put it there; if it is yours run `chown {me} {p}`, else remove it"
            ),
            Exposure::Writable { mode, dir } => format!(
                "{what} {p} can be written by users other than its owner (mode {mode:04o}); run `chmod {} {p}`",
                if dir { "700" } else { "600" }
            ),
        }
    }
}

/// Options that create a new file readable by the owner only.
fn private_file_options() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(uid: u32, gid: u32, mode: u32) -> Ownership {
        Ownership {
            uid,
            gid,
            mode,
            my_uid: 1000,
            my_gid: 1000,
        }
    }

    #[test]
    fn only_the_proxys_user_may_own_or_write_state() {
        let writable = |mode, dir| Some(Exposure::Writable { mode, dir });
        let foreign = |uid| Some(Exposure::ForeignOwner { uid, me: 1000 });
        let cases = [
            // (uid, gid, mode, a folder?, expected)
            (1000, 1000, 0o700, true, None),
            (1000, 1000, 0o600, false, None),
            (1000, 1000, 0o644, false, None),
            (1000, 1000, 0o666, false, writable(0o666, false)),
            (1000, 1000, 0o660, false, None),
            (1000, 2000, 0o660, false, writable(0o660, false)),
            (1000, 1000, 0o777, true, writable(0o777, true)),
            (1000, 2000, 0o770, true, writable(0o770, true)),
            // Kubernetes' fsGroup: root's volume, group-writable for the proxy's group.
            (0, 1000, 0o2770, true, None),
            (0, 1000, 0o2777, true, writable(0o2777, true)),
            (0, 0, 0o600, false, foreign(0)),
            (2000, 1000, 0o700, true, foreign(2000)),
            (2000, 1000, 0o600, false, foreign(2000)),
        ];
        for (uid, gid, mode, dir, expected) in cases {
            assert_eq!(
                exposure_of(owned(uid, gid, mode), dir),
                expected,
                "uid {uid} gid {gid} mode {mode:o} dir {dir}"
            );
        }
    }

    #[test]
    fn only_the_proxys_user_and_group_may_read_a_private_file() {
        let cases = [
            (0o600, 1000, None),
            (0o640, 1000, None),
            (0o640, 2000, Some(0o640)),
            (0o604, 1000, Some(0o604)),
            (0o644, 1000, Some(0o644)),
        ];
        for (mode, gid, expected) in cases {
            assert_eq!(
                readable_by_others(owned(0, gid, mode)),
                expected,
                "{mode:o} {gid}"
            );
        }
    }

    #[test]
    fn the_sentences_say_which_command_fixes_it() {
        let path = Path::new("/state/tokens");
        let writable = Exposure::Writable {
            mode: 0o777,
            dir: true,
        };
        assert!(
            writable
                .sentence("the folder", path)
                .ends_with("(mode 0777); run `chmod 700 /state/tokens`")
        );
        let foreign = Exposure::ForeignOwner { uid: 7, me: 8 };
        assert!(
            foreign
                .sentence("token file", path)
                .contains("run `chown 8 /state/tokens`, else remove it")
        );
        assert!(
            Exposure::Link
                .sentence("lock file", path)
                .ends_with("remove it with `rm /state/tokens`")
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_link_is_not_followed_and_a_new_file_never_replaces_one() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = no_follow(std::fs::OpenOptions::new().read(true))
            .open(&link)
            .unwrap_err();
        assert!(is_link_refusal(&e), "{e}");
        let meta = std::fs::symlink_metadata(&link).unwrap();
        assert_eq!(file_exposure(&meta), Some(Exposure::Link));
        let e = write_new(&link, b"new").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }

    #[test]
    fn temporaries_of_killed_writers_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dead = u32::MAX - 7; // above any pid the kernel hands out
        let live = std::process::id();
        for name in [
            format!(".a@b.c.json.{dead}.12345.tmp"),
            format!(".a@b.c.json.{live}.678.tmp"),
            "a@b.c.json".to_string(),
            format!(".{dead}.1.tmp"),
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(remove_stale_temporaries(dir.path()), 1);
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                format!(".{dead}.1.tmp"),
                format!(".a@b.c.json.{live}.678.tmp"),
                "a@b.c.json".to_string(),
            ]
        );
    }

    #[test]
    fn replaces_the_file_with_private_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("key.pem")]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
