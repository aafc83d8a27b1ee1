//! Files the listeners read at start and again whenever they change: token files and TLS
//! certificates.
//!
//! Each file is looked at once a second by its metadata (modification time, length, inode) as
//! `std::fs::metadata` sees it, which follows symlinks: a Kubernetes Secret's symlink swap
//! changes the inode behind the path, and is picked up like an edit. On a change everything is
//! read again together (a certificate and its key change as a pair); a version that does not
//! load is logged and the one loaded before stays in use. Polling rather than inotify: a
//! Secret's update replaces a directory symlink above the file, which an inotify watch on the
//! file never sees, and one `stat` a second per file costs nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

/// What identifies a version of a file: a change of any of these is a reload.
type Stamp = Option<(Option<SystemTime>, u64, u64)>;

fn stamp_of(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok(), meta.len(), meta.ino()))
}

/// How often the files are looked at.
const POLL: Duration = Duration::from_secs(1);

/// Loads `load()` now (an error fails the caller's start), and again every time one of `paths`
/// changes, for as long as the returned value is held.
pub(crate) fn watch<T, F>(
    paths: Vec<PathBuf>,
    what: &'static str,
    load: F,
) -> Result<Arc<ArcSwap<T>>, String>
where
    T: Send + Sync + 'static,
    F: Fn() -> Result<T, String> + Send + 'static,
{
    let current = Arc::new(ArcSwap::from_pointee(load()?));
    let weak = Arc::downgrade(&current);
    let mut seen: Vec<Stamp> = paths.iter().map(|p| stamp_of(p)).collect();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        loop {
            tick.tick().await;
            let Some(current) = weak.upgrade() else {
                return;
            };
            let now: Vec<Stamp> = paths.iter().map(|p| stamp_of(p)).collect();
            if now == seen {
                continue;
            }
            seen = now;
            match load() {
                Ok(value) => {
                    tracing::info!(what, "reloaded after a file changed");
                    current.store(Arc::new(value));
                }
                Err(e) => tracing::warn!(what, error = %e, "keeping what was loaded before"),
            }
        }
    });
    Ok(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Kubernetes Secret volume: the file is a symlink through `..data`, itself a symlink to
    /// a timestamped folder, and an update swaps `..data` to a new folder by rename.
    #[tokio::test]
    async fn a_secrets_symlink_swap_is_picked_up() {
        use std::os::unix::fs::symlink;
        let dir = std::env::temp_dir().join(format!("tailgate-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..v1")).unwrap();
        std::fs::write(dir.join("..v1/token"), "one").unwrap();
        symlink("..v1", dir.join("..data")).unwrap();
        symlink("..data/token", dir.join("token")).unwrap();
        let path = dir.join("token");
        let read = path.clone();
        let current = watch(vec![path], "test file", move || {
            std::fs::read_to_string(&read).map_err(|e| e.to_string())
        })
        .unwrap();
        assert_eq!(**current.load(), "one");

        std::fs::create_dir_all(dir.join("..v2")).unwrap();
        std::fs::write(dir.join("..v2/token"), "two").unwrap();
        symlink("..v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        std::fs::remove_dir_all(dir.join("..v1")).unwrap();
        let mut seen = String::new();
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            seen = current.load().to_string();
            if seen == "two" {
                break;
            }
        }
        assert_eq!(seen, "two", "the swapped file is read within a few seconds");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
