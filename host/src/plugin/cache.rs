//! The compile cache: Cranelift's output for each policy, kept on disk so that a restart, or a
//! reload of an unchanged policy, skips the compile (seconds of CPU for the agent pack).
//!
//! An artifact is native code: deserializing it runs whatever it holds outside the sandbox's
//! checks and the sha256 pin. So nothing in the directory is trusted for its name alone:
//! - The directory is created `0700`. It is used only if this user owns it and neither group
//!   nor others can write to it; otherwise the cache is off, with a warning naming the reason.
//! - Every file is written to a temporary name created exclusively (`O_EXCL`, mode `0600`),
//!   then renamed into place: the artifact first, then its manifest.
//! - The manifest, `<wasm sha256>-<engine>.manifest`, is the record this host wrote when it
//!   compiled that wasm with an engine of that compatibility hash. It holds the artifact's own
//!   sha256. An artifact is deserialized only when both are regular files of this user (not
//!   links, one name each, not writable by others) and the artifact's bytes hash to the
//!   manifest's value. Anything else in the directory is ignored. A mismatch is logged, and
//!   the policy is compiled afresh, which rewrites the entry.
//!
//! The artifact is hashed through the descriptor it was checked on, and after wasmtime has
//! mapped it by path the path must still name that same file: a swap in between is refused.
//! What this cannot stop is a process of this same user (or root), which could as well
//! replace the binary.
//!
//! Written here rather than taken from a crate: wasmtime's own cache (`wasmtime-cache`) keys
//! entries by name in a directory it trusts, which is the gap this closes.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// A checked cache directory.
pub(super) struct CompileCache {
    dir: PathBuf,
    /// Part of every entry's name: artifacts of another wasmtime or engine config never match.
    engine_key: u64,
}

/// Why an entry was not used: logged, then the policy is compiled.
type Rejection = String;

impl CompileCache {
    /// Creates the directory (`0700`) if it is missing, and checks who may write to it.
    pub(super) fn open(dir: PathBuf, engine: &Engine) -> Result<Self, String> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create it: {e}"))?;
        let meta = std::fs::metadata(&dir).map_err(|e| format!("cannot read it: {e}"))?;
        if !meta.is_dir() {
            return Err("it is not a directory".into());
        }
        owned_by_us(&meta, "the directory")?;
        let mut hasher = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
        Ok(Self {
            dir,
            engine_key: std::hash::Hasher::finish(&hasher),
        })
    }

    fn paths(&self, wasm_sha: &str) -> (PathBuf, PathBuf) {
        let stem = format!("{wasm_sha}-{:016x}", self.engine_key);
        (
            self.dir.join(format!("{stem}.cwasm")),
            self.dir.join(format!("{stem}.manifest")),
        )
    }

    /// The compiled form of the wasm whose sha256 is `wasm_sha`, if this host cached it and the
    /// artifact is still what it wrote. `Err` says why an entry that is there was not used.
    pub(super) fn get(
        &self,
        engine: &Engine,
        wasm_sha: &str,
    ) -> Result<Option<Component>, Rejection> {
        let (artifact, manifest) = self.paths(wasm_sha);
        let Some((file, _)) = open_ours(&manifest)? else {
            return Ok(None);
        };
        let mut expected = String::new();
        Read::take(&file, 128)
            .read_to_string(&mut expected)
            .map_err(|e| format!("{}: unreadable manifest: {e}", manifest.display()))?;
        let expected = expected.trim();
        let Some((file, meta)) = open_ours(&artifact)? else {
            return Err(format!(
                "{}: its manifest is there but the artifact is missing",
                manifest.display()
            ));
        };
        let actual = sha256_of(file)
            .map_err(|e| format!("{}: unreadable artifact: {e}", artifact.display()))?;
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(format!(
                "{}: its sha256 is {actual}, but the manifest this host wrote says {expected}",
                artifact.display()
            ));
        }
        // SAFETY: the file's bytes are those this host's engine serialized (their hash is in the
        // manifest written beside them, both ours and writable by no one else), and the engine
        // compatibility hash is in the name. The check below refuses a swap of the path.
        let component = unsafe { Component::deserialize_file(engine, &artifact) }
            .map_err(|e| format!("{}: {e:#}", artifact.display()))?;
        let now = std::fs::symlink_metadata(&artifact)
            .map_err(|e| format!("{}: {e}", artifact.display()))?;
        if (now.dev(), now.ino()) != (meta.dev(), meta.ino()) {
            return Err(format!(
                "{}: replaced while it was being loaded",
                artifact.display()
            ));
        }
        Ok(Some(component))
    }

    /// Stores a compiled component: the artifact, then the manifest that vouches for it.
    pub(super) fn put(&self, wasm_sha: &str, component: &Component) -> Result<(), String> {
        let bytes = component.serialize().map_err(|e| format!("{e:#}"))?;
        let (artifact, manifest) = self.paths(wasm_sha);
        let hash = hex::encode(Sha256::digest(&bytes));
        self.write_new(&artifact, &bytes)?;
        self.write_new(&manifest, format!("{hash}\n").as_bytes())
    }

    /// Writes `bytes` to a fresh file created exclusively, then renames it over `path`.
    fn write_new(&self, path: &Path, bytes: &[u8]) -> Result<(), String> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir.join(format!(
            ".{}.{}-{}.tmp",
            path.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .and_then(|mut f| f.write_all(bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        written.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("{}: {e}", path.display())
        })
    }
}

/// Opens a cache file without following a link, and checks that this user alone can change it.
/// `Ok(None)` when there is no such file.
fn open_ours(path: &Path) -> Result<Option<(File, Metadata)>, Rejection> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(format!("{}: is a symbolic link", path.display()));
        }
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    if meta.nlink() != 1 {
        return Err(format!(
            "{}: has {} names (hard links)",
            path.display(),
            meta.nlink()
        ));
    }
    owned_by_us(&meta, &path.display().to_string())?;
    Ok(Some((file, meta)))
}

fn owned_by_us(meta: &Metadata, what: &str) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "{what} is owned by uid {}, not by this process's uid {me}",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{what} is writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

fn sha256_of(mut file: File) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match file.read(&mut buf)? {
            0 => return Ok(hex::encode(hasher.finalize())),
            n => hasher.update(&buf[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn engine() -> Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        Engine::new(&config).unwrap()
    }

    /// The smallest components, told apart by the constant their core module's `f` returns.
    fn component(engine: &Engine, n: i32) -> Component {
        use wasm_encoder::{
            CodeSection, ExportKind, ExportSection, Function, FunctionSection, Module,
            ModuleSection, TypeSection, ValType,
        };
        let mut types = TypeSection::new();
        types.ty().function([], [ValType::I32]);
        let mut functions = FunctionSection::new();
        functions.function(0);
        let mut exports = ExportSection::new();
        exports.export("f", ExportKind::Func, 0);
        let mut f = Function::new([]);
        f.instructions().i32_const(n).end();
        let mut code = CodeSection::new();
        code.function(&f);
        let mut module = Module::new();
        module
            .section(&types)
            .section(&functions)
            .section(&exports)
            .section(&code);
        let mut component = wasm_encoder::Component::new();
        component.section(&ModuleSection(&module));
        Component::new(engine, component.finish()).unwrap()
    }

    fn dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tailgate-cache-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_stored_entry_is_found_and_an_absent_one_is_a_miss() {
        let engine = engine();
        let path = dir("hit");
        let _cleanup = Cleanup(path.clone());
        let cache = CompileCache::open(path.clone(), &engine).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "created for this user alone");
        assert!(cache.get(&engine, "aa").unwrap().is_none());
        cache.put("aa", &component(&engine, 1)).unwrap();
        let found = cache.get(&engine, "aa").unwrap().expect("a hit");
        assert_eq!(
            found.serialize().unwrap(),
            component(&engine, 1).serialize().unwrap()
        );
        let temps = std::fs::read_dir(&path)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().unwrap() == "tmp")
            .count();
        assert_eq!(temps, 0, "no temporary file is left behind");
    }

    #[test]
    fn an_artifact_without_a_manifest_or_unlike_it_is_never_loaded() {
        let engine = engine();
        let path = dir("forged");
        let _cleanup = Cleanup(path.clone());
        let cache = CompileCache::open(path.clone(), &engine).unwrap();
        let (artifact, manifest) = cache.paths("bb");
        // Planted under the right name, with no manifest: ignored.
        std::fs::write(&artifact, component(&engine, 2).serialize().unwrap()).unwrap();
        assert!(cache.get(&engine, "bb").unwrap().is_none());
        // Another component's artifact swapped in under an entry this host wrote: refused.
        cache.put("bb", &component(&engine, 3)).unwrap();
        let forged = component(&engine, 4).serialize().unwrap();
        std::fs::write(&artifact, &forged).unwrap();
        let err = cache.get(&engine, "bb").unwrap_err();
        assert!(err.contains("manifest this host wrote"), "{err}");
        // A manifest rewritten to vouch for it, but left writable by others: refused too.
        std::fs::write(&manifest, hex::encode(Sha256::digest(&forged))).unwrap();
        std::fs::set_permissions(&manifest, std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = cache.get(&engine, "bb").unwrap_err();
        assert!(err.contains("writable by group or others"), "{err}");
        // A link in place of the artifact is not followed.
        cache.put("bb", &component(&engine, 3)).unwrap();
        let elsewhere = path.join("elsewhere");
        std::fs::rename(&artifact, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &artifact).unwrap();
        let err = cache.get(&engine, "bb").unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
    }

    #[test]
    fn a_directory_others_can_write_is_not_used() {
        let engine = engine();
        let path = dir("open");
        let _cleanup = Cleanup(path.clone());
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = CompileCache::open(path.clone(), &engine).err().unwrap();
        assert!(err.contains("writable by group or others"), "{err}");
    }
}
