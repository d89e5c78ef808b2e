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

/// Checks that a script is safe to run as root: the file (after following
/// symlinks) is a regular file, owned by root, not writable by group or
/// others, and executable; and the directory holding it is owned by root and
/// not writable by group or others (unless sticky), so that nobody else can
/// replace it. Every problem found is reported with the command that fixes it.
pub fn check_script(path: &Path) -> Result<(), HookError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
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
    let target = fs::canonicalize(path).map_err(|source| HookError::Io {
        path: path.to_owned(),
        source,
    })?;
    let shown = if target == path {
        path.display().to_string()
    } else {
        format!("{} (-> {})", path.display(), target.display())
    };
    let fixed = target.display();
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
        return Err(HookError::Unsafe {
            path: path.to_owned(),
            reasons,
        });
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
    if let Some(dir) = target.parent() {
        match fs::metadata(dir) {
            Ok(d) => {
                if d.uid() != 0 {
                    reasons.push(format!(
                        "directory {} holding {shown} is owned by uid {}, not root; run chown root {}",
                        dir.display(),
                        d.uid(),
                        dir.display()
                    ));
                }
                let sticky = d.mode() & 0o1000 != 0;
                if let (false, Some(who)) = (sticky, writable_by(d.mode())) {
                    reasons.push(format!(
                        "directory {} holding {shown} is {who}; run chmod g-w,o-w {}",
                        dir.display(),
                        dir.display()
                    ));
                }
            }
            Err(source) => {
                return Err(HookError::Io {
                    path: dir.to_owned(),
                    source,
                });
            }
        }
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(HookError::Unsafe {
            path: path.to_owned(),
            reasons,
        })
    }
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
