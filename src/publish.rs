//! File sinks (README "File sinks"): atomic replacement with the configured mode and
//! group, content skipped when unchanged, and the `on_change` hooks.
//!
//! Everything here is blocking file I/O; the refresher calls it from
//! `spawn_blocking`.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::clock::rfc3339;
use crate::config::{Format, Problem, SinkConfig};
use crate::secret::Secret;

/// The files of every sink, and a hook runner for each sink that has one.
pub struct Publisher {
    sinks: Vec<Arc<SinkConfig>>,
    /// Per sink index: its hook's queue.
    hooks: HashMap<usize, Hook>,
}

/// What a hook run is told about one credential's file (README "File
/// sinks"): never the token.
struct HookChange {
    event: &'static str,
    path: PathBuf,
    expires_at: Option<i64>,
}

/// The changes a sink's hook has yet to hear of, one per credential in the
/// order they first came: a credential that changes again while it waits
/// is told its latest change once, so a burst of ten thousand rotations
/// costs one run per credential, not one per write.
#[derive(Default)]
struct HookPending {
    order: VecDeque<String>,
    latest: HashMap<String, HookChange>,
}

struct Hook {
    pending: Arc<Mutex<HookPending>>,
    /// One slot: a full one means the runner will look at `pending` again.
    wake: mpsc::Sender<()>,
}

impl Hook {
    fn tell(&self, name: &str, change: HookChange) {
        {
            let mut p = self.pending.lock().unwrap();
            if p.latest.insert(name.to_owned(), change).is_none() {
                p.order.push_back(name.to_owned());
            }
        }
        let _ = self.wake.try_send(());
    }
}

impl Publisher {
    /// Must be called inside a tokio runtime: hooks run as tasks.
    pub fn new(sinks: &[Arc<SinkConfig>]) -> Publisher {
        let mut hooks = HashMap::new();
        for s in sinks {
            if let Some(argv) = &s.on_change {
                let (wake, rx) = mpsc::channel(1);
                let pending = Arc::new(Mutex::new(HookPending::default()));
                tokio::spawn(run_hook(
                    argv.clone(),
                    s.on_change_timeout,
                    s.index,
                    s.format,
                    pending.clone(),
                    rx,
                ));
                hooks.insert(s.index, Hook { pending, wake });
            }
        }
        Publisher {
            sinks: sinks.to_vec(),
            hooks,
        }
    }

    /// Every file this configuration writes for `name`.
    pub fn paths_for(&self, name: &str) -> Vec<PathBuf> {
        self.sinks
            .iter()
            .filter(|s| s.matches(name))
            .map(|s| s.path_for(name))
            .collect()
    }

    /// Writes the token to every matching sink whose file differs. Returns
    /// one message per sink that failed; the others are written regardless.
    pub fn publish(&self, name: &str, token: &Secret, expires_at: Option<i64>) -> Vec<String> {
        let mut errors = Vec::new();
        for s in self.sinks.iter().filter(|s| s.matches(name)) {
            let path = s.path_for(name);
            let content = render(s.format, token, expires_at);
            match write_atomic(&path, &content, s.mode, s.group.as_ref().map(|g| g.1)) {
                Ok(true) => {
                    tracing::debug!(credential = name, path = %path.display(), "published");
                    if let Some(h) = self.hooks.get(&s.index) {
                        h.tell(
                            name,
                            HookChange {
                                event: "written",
                                path,
                                expires_at,
                            },
                        );
                    }
                }
                Ok(false) => {}
                Err(e) => errors.push(format!("cannot write {}: {e}", path.display())),
            }
        }
        errors
    }

    /// Removes the temp files a crash left behind (`.FILE.tokend-PID-RAND`,
    /// written with the sink's mode and holding a token): ours only (owned
    /// by our uid, named by our pattern), and not those of a live process,
    /// which may be in the middle of a write. `names` are the credentials
    /// whose directories to look in (every one at start, a removed one at
    /// removal); each directory is read once. Returns how many went.
    pub fn sweep_temp_files<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> usize {
        sweep_temp_files(&self.sinks, names)
    }

    /// Removes the credential's files, so consumers fail fast instead of
    /// using a dead token.
    pub fn unpublish(&self, name: &str) -> Vec<String> {
        self.remove_files(name, false)
    }

    /// [`Publisher::unpublish`] for a credential removed from the store:
    /// hooks hear of it even when its files were gone already (`tokend
    /// remove` deletes them itself, and cannot run hooks in the daemon's
    /// environment).
    pub fn forget(&self, name: &str) -> Vec<String> {
        self.remove_files(name, true)
    }

    fn remove_files(&self, name: &str, forgotten: bool) -> Vec<String> {
        let mut errors = Vec::new();
        for s in self.sinks.iter().filter(|s| s.matches(name)) {
            let path = s.path_for(name);
            let removed = match fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(credential = name, path = %path.display(), "removed token file");
                    if let Some(dir) = path.parent() {
                        // Shared, as a write's is (src/dirsync.rs).
                        let _ = crate::dirsync::sync(dir);
                    }
                    true
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => forgotten,
                Err(e) => {
                    errors.push(format!("cannot remove {}: {e}", path.display()));
                    false
                }
            };
            if removed && let Some(h) = self.hooks.get(&s.index) {
                let change = HookChange {
                    event: "removed",
                    path,
                    expires_at: None,
                };
                h.tell(name, change);
            }
        }
        errors
    }
}

/// The bytes of a sink file (README "File sinks").
pub fn render(format: Format, token: &Secret, expires_at: Option<i64>) -> Vec<u8> {
    let t = token.expose();
    match format {
        Format::Raw => t.as_bytes().to_vec(),
        Format::Header => format!("Authorization: Bearer {t}\n").into_bytes(),
        Format::Env => format!("ACCESS_TOKEN={t}\n").into_bytes(),
        Format::Json => {
            // A struct, not json!(), to keep the field order of the spec.
            #[derive(serde::Serialize)]
            struct Json<'a> {
                access_token: &'a str,
                token_type: &'a str,
                expires_at: Option<String>,
            }
            serde_json::to_vec(&Json {
                access_token: t,
                token_type: "Bearer",
                expires_at: expires_at.map(rfc3339),
            })
            .expect("strings serialize")
        }
    }
}

/// Replaces `path` so that a reader sees the old whole file or the new whole
/// file, never a part, an empty file or a wrong mode: a temp file in the same
/// directory gets the final mode and group before any byte is written, then
/// write, fsync, rename over, fsync the directory. Returns false, writing
/// nothing, when the file already holds exactly this, with this mode and group.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32, gid: Option<u32>) -> io::Result<bool> {
    let mut current = open_current(path).and_then(|f| Some((f.metadata().ok()?, f)));
    if let Some((meta, f)) = current.as_mut()
        && holds(f, meta, content, mode, gid)
    {
        return Ok(false);
    }
    // Only where that helps and is safe: see below.
    let mut current = current
        .filter(|(meta, f)| deleted_in_kernel(f, meta))
        .map(|(_, f)| f);
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no parent directory"))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{file_name}.tokend-{}-{:08x}",
        own_pid(),
        fastrand::u32(..)
    ));
    let result = (|| {
        // 0600 whatever the umask (no group or other bits yet); then the
        // group, then the exact final mode, all before the content.
        let create = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)
        };
        // A directory that depends on `{name}` is made on its first file.
        let mut f = match create() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_dirs(dir)?;
                create()?
            }
            r => r?,
        };
        if let Some(gid) = gid {
            std::os::unix::fs::fchown(&f, None, Some(gid))?;
        }
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(content)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // The replaced file is deleted (its blocks freed, its inode evicted)
        // when its last descriptor closes. Were ours closed already, that
        // would happen inside rename(2), under the directory's lock that
        // every writer of this directory takes in turn: on ext4 that
        // deletion is most of a replacement's time. Closed now, it runs
        // beside the other writers' renames (BENCHMARKS.md "Replacing
        // files").
        drop(current.take());
        // Shared with the other writers of this directory (src/dirsync.rs).
        crate::dirsync::sync(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| true)
}

/// This process's pid, for its temp files' names: asked of the kernel
/// once, not on every write (glibc does not cache it).
fn own_pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}

/// The file now at `path`, if one can be opened: never through a symlink,
/// without waiting for a writer if someone left a FIFO there, and never
/// taking a terminal left there as tokend's controlling one (whose hangup
/// would be SIGHUP, a reload).
fn open_current(path: &Path) -> Option<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ok()
}

/// Is `f` a regular file on a local disk file system, whose kernel deletes
/// a replaced file at its last close? Holding it across the rename pays
/// there (ext4 measured; xfs and btrfs delete the same way). Not on a
/// network file system: NFS's client renames a file still open elsewhere
/// out of the way (`.nfsXXXX`) before replacing it, and between the two
/// another client can find no file at all.
fn deleted_in_kernel(f: &File, meta: &fs::Metadata) -> bool {
    use std::os::fd::AsRawFd;
    if !meta.is_file() {
        return false;
    }
    // SAFETY: statfs is plain old data, filled in by fstatfs on success.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a pointer to a statfs we own.
    if unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    // libc types these as the kernel's f_type on each architecture.
    [
        libc::EXT4_SUPER_MAGIC,
        libc::XFS_SUPER_MAGIC,
        libc::BTRFS_SUPER_MAGIC,
    ]
    .contains(&st.f_type)
}

/// Does `f` already hold exactly `content`, with this mode and group?
fn holds(f: &mut File, meta: &fs::Metadata, content: &[u8], mode: u32, gid: Option<u32>) -> bool {
    if !meta.is_file()
        || meta.permissions().mode() & 0o7777 != mode
        || gid.is_some_and(|g| meta.gid() != g)
        || meta.len() != content.len() as u64
    {
        return false;
    }
    let mut existing = Vec::with_capacity(content.len());
    f.read_to_end(&mut existing).is_ok() && existing == content
}

/// What [`Publisher::sweep_temp_files`] does, for a command without a
/// runtime (`tokend remove`).
pub fn sweep_temp_files<'a>(
    sinks: &[Arc<SinkConfig>],
    names: impl IntoIterator<Item = &'a str>,
) -> usize {
    let mut dirs = std::collections::HashSet::new();
    for name in names {
        for s in sinks.iter().filter(|s| s.matches(name)) {
            if let Some(d) = s.path_for(name).parent() {
                dirs.insert(d.to_owned());
            }
        }
    }
    dirs.iter().map(|d| sweep_dir(d)).sum()
}

/// The pid in a temp file name of ours: `.FILE.tokend-PID-XXXXXXXX`.
fn temp_file_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (_, tail) = rest.rsplit_once(".tokend-")?;
    let (pid, rand) = tail.split_once('-')?;
    let hex = rand.len() == 8 && rand.bytes().all(|b| b.is_ascii_hexdigit());
    let digits = !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
    (hex && digits).then(|| pid.parse().ok()).flatten()
}

/// Removes `dir`'s stale temp files of ours (see `sweep_temp_files`).
pub(crate) fn sweep_dir(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let me = std::process::id();
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(temp_file_pid) else {
            continue;
        };
        let Ok(meta) = e.path().symlink_metadata() else {
            continue;
        };
        // Another process's write in progress is left alone; so is a file
        // of ours from now (a write of this process, which cleans up after
        // itself).
        if !meta.is_file() || meta.uid() != uid || pid == me || crate::lease::pid_exists(pid) {
            continue;
        }
        match fs::remove_file(e.path()) {
            Ok(()) => {
                removed += 1;
                tracing::info!(path = %e.path().display(), "removed a temp file left by an earlier run");
            }
            Err(err) => {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot remove a stale temp file")
            }
        }
    }
    if removed > 0 {
        let _ = sync_dir(dir);
    }
    removed
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Can every sink directory be written? At start-up (`create`), missing
/// directories are made (0755: consumers must reach their files) and a probe
/// file is written; `check-config` only asks the kernel, changing nothing.
/// Directories that depend on `{name}` are made when first needed.
pub fn check_dirs(sinks: &[Arc<SinkConfig>], create: bool) -> Vec<Problem> {
    let mut problems = Vec::new();
    for s in sinks {
        let Some(dir) = Path::new(&s.path).parent() else {
            continue;
        };
        let dir = match dir.to_string_lossy().find("{name}") {
            // The part of the path that does not depend on the name:
            // `/run/tokens/{name}/token` → `/run/tokens`, and
            // `/run/tokens/app-{name}/token` → `/run/tokens` too.
            Some(i) => match name_free_dir(&dir.to_string_lossy()[..i]) {
                Some(d) if !create => d,
                _ => continue,
            },
            None => dir.to_owned(),
        };
        let result = if create {
            probe_dir(&dir, s.group.as_ref().map(|g| g.1))
        } else {
            writable(&dir)
        };
        if let Err(e) = result {
            problems.push(Problem {
                key: format!("sinks[{}].path", s.index),
                message: format!("cannot write to {}: {e}", dir.display()),
            });
        }
    }
    problems
}

/// The directory of a sink path's part before `{name}`: that part itself
/// when it ends at a `/`, else its parent.
fn name_free_dir(prefix: &str) -> Option<PathBuf> {
    match prefix.strip_suffix('/') {
        Some("") => Some(PathBuf::from("/")),
        Some(d) => Some(PathBuf::from(d)),
        None => Path::new(prefix).parent().map(Path::to_owned),
    }
}

/// Whether `path`, or the nearest ancestor that exists, is writable by us.
pub fn writable(path: &Path) -> io::Result<()> {
    let mut p = path;
    while !p.exists() {
        p = p.parent().unwrap_or(Path::new("/"));
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: `c` is a valid NUL-terminated path for the call's duration.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn probe_dir(dir: &Path, gid: Option<u32>) -> io::Result<()> {
    if !dir.exists() {
        create_dirs(dir)?;
    }
    let probe = dir.join(format!(".tokend-probe-{}", std::process::id()));
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)?;
    let chown = gid.map(|g| std::os::unix::fs::fchown(&f, None, Some(g)));
    drop(f);
    fs::remove_file(&probe)?;
    match chown {
        Some(Err(e)) => Err(io::Error::new(
            e.kind(),
            format!("cannot give files the configured group: {e}"),
        )),
        _ => Ok(()),
    }
}

/// Creates `dir` and its missing ancestors 0755 whatever the umask:
/// consumers must reach their files, and under the unit's `UMask=0077`
/// `mkdir` alone would make them 0700.
fn create_dirs(dir: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    DirBuilder::new().recursive(true).mode(0o755).create(dir)?;
    for d in missing {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// How `TOKEND_FORMAT` names a sink's format: as the config does.
/// A command for an `on_change` hook or a `[[notify]]` rule: argv, no
/// shell, no stdin, killed if dropped, and an environment cleared but for
/// PATH, LANG and the `vars` given, so that nothing tokend was started
/// with (a client secret in an environment variable) ever reaches it.
pub fn hook_command<'a>(
    argv: &[String],
    vars: impl IntoIterator<Item = (&'a str, String)>,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(vars)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for var in ["PATH", "LANG"] {
        if let Ok(v) = std::env::var(var) {
            cmd.env(var, v);
        }
    }
    cmd
}

fn format_name(f: Format) -> &'static str {
    match f {
        Format::Raw => "raw",
        Format::Header => "header",
        Format::Env => "env",
        Format::Json => "json",
    }
}

/// Runs a sink's `on_change` argv (no shell) once per credential whose file
/// changed, one run at a time, killing a run that outlives its timeout. The
/// environment is cleared (but for PATH and LANG) so that a client secret
/// passed to us in an environment variable never reaches a hook; it gets
/// what changed instead (README "File sinks"), never the token.
async fn run_hook(
    argv: Vec<String>,
    timeout: Duration,
    index: usize,
    format: Format,
    pending: Arc<Mutex<HookPending>>,
    mut rx: mpsc::Receiver<()>,
) {
    while rx.recv().await.is_some() {
        loop {
            let next = {
                let mut p = pending.lock().unwrap();
                let name = p.order.pop_front();
                name.and_then(|n| p.latest.remove(&n).map(|c| (n, c)))
            };
            let Some((name, change)) = next else { break };
            let mut cmd = hook_command(
                &argv,
                [
                    ("TOKEND_CREDENTIAL", name.clone()),
                    ("TOKEND_EVENT", change.event.to_owned()),
                    ("TOKEND_PATH", change.path.display().to_string()),
                    ("TOKEND_FORMAT", format_name(format).to_owned()),
                    (
                        "TOKEND_EXPIRES_AT",
                        change.expires_at.map(rfc3339).unwrap_or_default(),
                    ),
                ],
            );
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(sink = index, credential = %name, program = %argv[0], error = %e, "on_change hook could not start");
                    continue;
                }
            };
            match tokio::time::timeout(timeout, child.wait()).await {
                Ok(Ok(status)) if status.success() => {
                    tracing::debug!(sink = index, credential = %name, program = %argv[0], "on_change hook ran");
                }
                Ok(Ok(status)) => {
                    tracing::warn!(sink = index, credential = %name, program = %argv[0], %status, "on_change hook failed");
                }
                Ok(Err(e)) => {
                    tracing::warn!(sink = index, credential = %name, program = %argv[0], error = %e, "on_change hook failed");
                }
                Err(_) => {
                    let _ = child.kill().await;
                    tracing::warn!(sink = index, credential = %name, program = %argv[0], ?timeout, "on_change hook timed out and was killed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let t = Secret::new("TOK");
        assert_eq!(render(Format::Raw, &t, None), b"TOK");
        assert_eq!(
            render(Format::Header, &t, None),
            b"Authorization: Bearer TOK\n"
        );
        assert_eq!(render(Format::Env, &t, None), b"ACCESS_TOKEN=TOK\n");
        assert_eq!(
            String::from_utf8(render(Format::Json, &t, Some(0))).unwrap(),
            r#"{"access_token":"TOK","token_type":"Bearer","expires_at":"1970-01-01T00:00:00Z"}"#
        );
    }

    #[test]
    fn atomic_write_sets_exact_mode_and_skips_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/tok");
        assert!(write_atomic(&path, b"one", 0o640, None).unwrap());
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640);
        assert!(!write_atomic(&path, b"one", 0o640, None).unwrap());
        assert!(write_atomic(&path, b"one", 0o600, None).unwrap());
        assert!(write_atomic(&path, b"two", 0o600, None).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"two");
        // No temp files are left behind.
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn a_replaced_file_is_let_go_and_a_fifo_is_replaced_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tok");
        fs::write(&path, "old").unwrap();
        assert!(write_atomic(&path, b"new", 0o600, None).unwrap());
        // Held across the rename or not (deleted_in_kernel), the old file
        // is let go once the write returns: no descriptor of ours keeps it,
        // and its disk blocks, alive.
        let held: Vec<_> = fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter_map(|e| fs::read_link(e.path()).ok())
            .filter(|l| l.starts_with(dir.path()))
            .collect();
        assert!(held.is_empty(), "still open: {held:?}");

        // A FIFO with no writer must not hang the publication.
        fs::remove_file(&path).unwrap();
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || tx.send(write_atomic(&p, b"new", 0o600, None)));
        let written = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the write waited on the FIFO");
        assert!(written.unwrap());
        assert!(fs::metadata(&path).unwrap().is_file());
        assert_eq!(fs::read(&path).unwrap(), b"new");

        // Never held: a FIFO, nor a file on tmpfs (nothing to gain there).
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let held = |path: &Path| {
            let f = open_current(path).unwrap();
            deleted_in_kernel(&f, &f.metadata().unwrap())
        };
        assert!(!held(&fifo));
        if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
            let f = shm.path().join("tok");
            fs::write(&f, "x").unwrap();
            assert!(!held(&f));
        }
    }

    #[test]
    fn the_directory_before_a_name_is_the_one_checked() {
        assert_eq!(
            name_free_dir("/run/tokens/"),
            Some(PathBuf::from("/run/tokens"))
        );
        assert_eq!(
            name_free_dir("/run/tokens/app-"),
            Some(PathBuf::from("/run/tokens"))
        );
        assert_eq!(name_free_dir("/"), Some(PathBuf::from("/")));
    }

    #[test]
    fn temp_file_names_are_recognised() {
        assert_eq!(temp_file_pid(".bot.tokend-123-0a1b2c3d"), Some(123));
        assert_eq!(temp_file_pid(".a.b.json.tokend-7-ffffffff"), Some(7));
        for other in [
            "bot",
            ".bot",
            ".bot.tokend-123",
            ".bot.tokend-x-0a1b2c3d",
            ".bot.tokend-123-0a1b2c3",
            "bot.tokend-123-0a1b2c3d",
            ".tokend-probe-12",
        ] {
            assert_eq!(temp_file_pid(other), None, "{other}");
        }
    }

    #[test]
    fn a_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, "keep").unwrap();
        let link = dir.path().join("tok");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(write_atomic(&link, b"new", 0o600, None).unwrap());
        assert_eq!(fs::read(&target).unwrap(), b"keep");
        assert!(fs::symlink_metadata(&link).unwrap().is_file());
    }
}
