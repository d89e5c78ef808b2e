//! Finding a service's hook scripts (one folder per service, ordered by name,
//! one letter per action) and the checks that make them safe to run as root.

use std::ffi::OsString;
use std::fs::{self};
use std::io::{self};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kubeha_crds::service::Role;

use super::{Action, HookError, role_str};

/// How a service's hook scripts are laid out in its hook directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HookLayout {
    /// Scripts named `<Letter><two digits><name>` (`E01server`, `L01server`,
    /// `M01check`, `P01stopped`), run in lexical order.
    Directory,
    /// One script (`ha.sh` style) in the hook directory, called for every
    /// action with the action as its first argument.
    SingleScript(String),
}

/// A service's hook scripts: where they are and how they are laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookSet {
    /// The directory holding the scripts.
    pub dir: PathBuf,
    /// Directory of `E<nn>`/`L<nn>`/`M<nn>`/`P<nn>` scripts, or one script.
    pub layout: HookLayout,
}

/// One script to run for one action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Script {
    /// Where the script is.
    pub path: PathBuf,
    /// Its file name (names its log file and its [`HookResult`]).
    pub name: String,
    /// The action it is run for (its first argument).
    pub action: Action,
}

impl Script {
    /// The argv the script is run with: `[path, ACTION, ROLE]`, for both
    /// layouts.
    pub fn argv(&self, role: Role) -> Vec<OsString> {
        vec![
            self.path.clone().into_os_string(),
            OsString::from(self.action.as_str()),
            OsString::from(role_str(role)),
        ]
    }
}

impl HookSet {
    /// The scripts to run for `action`, in the order to run them.
    ///
    /// Directory layout: the entries named `<Letter><two digits><name>` (the
    /// letter of `action`, a non-empty name) in lexical byte order, so
    /// `E01backup`, `E01server`, `E02client`. Other names (`README`, `E1x`,
    /// lower-case letters) and editor or package-manager leftovers
    /// (`E01server~`, `.bak`, `.orig`, `.swp`, `.rpmnew`, `.rpmsave`,
    /// `.rpmorig`, `.dpkg-*`) are ignored, as are directories. Anything else
    /// that matches (a regular file, but also a dangling symlink or a FIFO) is
    /// listed so that [`check_script`] refuses it loudly rather than a start
    /// script being skipped in silence.
    ///
    /// Single-script layout: that one file, whatever the action.
    pub fn scripts(&self, action: Action) -> Result<Vec<Script>, HookError> {
        match &self.layout {
            HookLayout::SingleScript(name) => {
                if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                    return Err(HookError::InvalidScriptName { name: name.clone() });
                }
                Ok(vec![Script {
                    path: self.dir.join(name),
                    name: name.clone(),
                    action,
                }])
            }
            HookLayout::Directory => {
                let read_err = |source| HookError::ReadDir {
                    path: self.dir.clone(),
                    source,
                };
                let mut found = Vec::new();
                for entry in fs::read_dir(&self.dir).map_err(read_err)? {
                    let entry = entry.map_err(read_err)?;
                    let Ok(name) = entry.file_name().into_string() else {
                        continue;
                    };
                    if !matches_script_name(&name, action.prefix()) {
                        continue;
                    }
                    let path = entry.path();
                    // Follows symlinks; a dangling one stays listed.
                    if fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
                        continue;
                    }
                    found.push(Script { path, name, action });
                }
                found.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
                Ok(found)
            }
        }
    }
}

/// Whether `name` is `<letter><digit><digit><name>` and not a backup copy.
pub(super) fn matches_script_name(name: &str, letter: char) -> bool {
    let [first, d1, d2, rest @ ..] = name.as_bytes() else {
        return false;
    };
    if char::from(*first) != letter
        || !d1.is_ascii_digit()
        || !d2.is_ascii_digit()
        || rest.is_empty()
    {
        return false;
    }
    const LEFTOVERS: [&str; 7] = [
        ".bak", ".orig", ".swp", ".rpmnew", ".rpmsave", ".rpmorig", "~",
    ];
    !(LEFTOVERS.iter().any(|s| name.ends_with(s)) || name.contains(".dpkg-"))
}

/// Checks that a script is safe to run as root, like keepalived's script
/// security: [`check_script_at`] from `/`, with no root to stay inside.
pub fn check_script(path: &Path) -> Result<(), HookError> {
    check_script_at(Path::new("/"), path, None)
}

/// Checks that the script at `path` is safe to run as root. `path` (and
/// `root`) are absolute paths as the host sees them, read through `base`
/// (`/`, or `/proc/<pid>/root` for the host's files seen from a container;
/// symlinks resolve inside `base`).
///
/// The script, after following symlinks, must be a regular executable file
/// owned by root and writable by nobody else; every directory from `/` down
/// to it must be owned by root and not writable by group or others (a
/// sticky directory, such as `/tmp`, may be), so that nobody but root can
/// replace the script or any directory on its way. With `root` (the hook
/// root), the script must resolve inside it: a symlink that leads out of
/// the root is refused. Every problem found is reported with the command
/// that fixes it.
pub fn check_script_at(base: &Path, path: &Path, root: Option<&Path>) -> Result<(), HookError> {
    let resolved = match resolve(base, path) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(HookError::NotFound {
                path: path.to_owned(),
            });
        }
        Err(source) => {
            return Err(HookError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let real = |p: &Path| base.join(p.strip_prefix("/").unwrap_or(p));
    let shown = if resolved == path {
        path.display().to_string()
    } else {
        format!("{} (-> {})", path.display(), resolved.display())
    };
    let unsafe_because = |reasons: Vec<String>| HookError::Unsafe {
        path: path.to_owned(),
        reasons,
    };
    if let Some(root) = root {
        let inside = resolve(base, root).map_err(|source| HookError::Io {
            path: root.to_owned(),
            source,
        })?;
        if !resolved.starts_with(&inside) {
            return Err(unsafe_because(vec![format!(
                "{shown} leads out of the hook root {}: a symlink on its way points outside; put the script itself under the root",
                inside.display()
            )]));
        }
    }
    let meta = fs::metadata(real(&resolved)).map_err(|source| HookError::Io {
        path: path.to_owned(),
        source,
    })?;
    let fixed = resolved.display();
    let mut reasons = Vec::new();

    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        reasons.push(format!(
            "{shown} is {kind}; a hook must be a regular executable file"
        ));
        return Err(unsafe_because(reasons));
    }
    if meta.uid() != 0 {
        reasons.push(format!(
            "{shown} is owned by uid {}, not root; run chown root {fixed}",
            meta.uid()
        ));
    }
    if let Some(who) = writable_by(meta.mode()) {
        reasons.push(format!("{shown} is {who}; run chmod g-w,o-w {fixed}"));
    }
    if meta.mode() & 0o111 == 0 {
        reasons.push(format!("{shown} is not executable; run chmod u+x {fixed}"));
    }
    // Every directory on the way, the nearest first.
    for dir in resolved.ancestors().skip(1) {
        let d = fs::metadata(real(dir)).map_err(|source| HookError::Io {
            path: dir.to_owned(),
            source,
        })?;
        if d.uid() != 0 {
            reasons.push(format!(
                "directory {} on the way to {shown} is owned by uid {}, not root; run chown root {}",
                dir.display(),
                d.uid(),
                dir.display()
            ));
        }
        let sticky = d.mode() & 0o1000 != 0;
        if let (false, Some(who)) = (sticky, writable_by(d.mode())) {
            reasons.push(format!(
                "directory {} on the way to {shown} is {who}; run chmod g-w,o-w {}",
                dir.display(),
                dir.display()
            ));
        }
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(unsafe_because(reasons))
    }
}

/// Most symlinks followed while resolving one path (as the kernel's 40).
const MAX_SYMLINKS: usize = 40;

/// `path` (absolute) with every symlink resolved, as seen through `base`:
/// an absolute link target starts again at `base`, `..` never climbs above
/// it. The result is absolute and names no symlink.
pub(super) fn resolve(base: &Path, path: &Path) -> io::Result<PathBuf> {
    use std::collections::VecDeque;
    use std::path::Component;
    fn parts(p: &Path) -> VecDeque<OsString> {
        p.components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_owned()),
                Component::ParentDir => Some(OsString::from("..")),
                Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
            })
            .collect()
    }
    let mut resolved = PathBuf::from("/");
    let mut pending = parts(path);
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&part);
        let real = base.join(candidate.strip_prefix("/").unwrap_or(&candidate));
        if fs::symlink_metadata(&real)?.file_type().is_symlink() {
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(io::Error::other(format!(
                    "more than {MAX_SYMLINKS} symlinks on the way to {}",
                    path.display()
                )));
            }
            let target = fs::read_link(&real)?;
            if target.is_absolute() {
                resolved = PathBuf::from("/");
            }
            let mut next = parts(&target);
            next.extend(pending);
            pending = next;
        } else {
            resolved = candidate;
        }
    }
    Ok(resolved)
}

/// "group-writable", "writable by others", both, or nothing.
pub(super) fn writable_by(mode: u32) -> Option<&'static str> {
    match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => Some("group-writable and writable by others"),
        (true, false) => Some("group-writable"),
        (false, true) => Some("writable by others"),
        (false, false) => None,
    }
}
