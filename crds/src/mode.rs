//! Administrative modes and the rules on their combination (StorNext-style).
//!
//! The API server rejects what CEL can see on `spec.members.nodes`; these
//! functions are the same rules for the operator, which also sees members
//! picked by a selector.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A member's administrative mode.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Monitoring on; runs services with redundancy.
    #[default]
    Default,
    /// Runs services without redundancy, monitoring off.
    Single,
    /// Reconfiguration, monitoring off.
    Config,
    /// Services stopped and kept off; the agent still heartbeats.
    Locked,
    /// Certified powered off by an admin; counts as fenced.
    Peerdown,
}

impl Mode {
    /// The lowercase name used in the API and in cluster state strings.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Default => "default",
            Mode::Single => "single",
            Mode::Config => "config",
            Mode::Locked => "locked",
            Mode::Peerdown => "peerdown",
        }
    }

    /// Whether services may run on a member in this mode.
    pub fn allows_services(self) -> bool {
        matches!(self, Mode::Default | Mode::Single | Mode::Config)
    }

    /// Whether a mode is one of the exclusive ones (`single`, `config`).
    pub fn is_exclusive(self) -> bool {
        matches!(self, Mode::Single | Mode::Config)
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a combination of modes is prohibited.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProhibitedModes {
    /// Two or more members in `single` or `config`.
    #[error(
        "members {0:?} are all in mode single or config; at most one may be, set the others to locked or peerdown"
    )]
    SeveralExclusive(Vec<String>),
    /// One member in `single`/`config` while another is `default`.
    #[error(
        "member {exclusive} is in mode {mode} while {others:?} are in mode default; set them to locked or peerdown"
    )]
    ExclusiveWithDefault {
        /// The member in single or config.
        exclusive: String,
        /// Its mode.
        mode: Mode,
        /// The members still in default.
        others: Vec<String>,
    },
    /// Every member is `peerdown`.
    #[error(
        "every member is peerdown, so nothing could run; keep at least one member in default, single, config or locked"
    )]
    AllPeerdown,
}

/// Checks a cluster's modes (member name, mode) against the allowed states.
pub fn check_modes<'a>(
    members: impl IntoIterator<Item = (&'a str, Mode)>,
) -> Result<(), ProhibitedModes> {
    let members: Vec<(&str, Mode)> = members.into_iter().collect();
    let exclusive: Vec<&(&str, Mode)> = members.iter().filter(|(_, m)| m.is_exclusive()).collect();
    if exclusive.len() > 1 {
        return Err(ProhibitedModes::SeveralExclusive(
            exclusive.iter().map(|(n, _)| n.to_string()).collect(),
        ));
    }
    if let Some((name, mode)) = exclusive.first() {
        let others: Vec<String> = members
            .iter()
            .filter(|(_, m)| *m == Mode::Default)
            .map(|(n, _)| n.to_string())
            .collect();
        if !others.is_empty() {
            return Err(ProhibitedModes::ExclusiveWithDefault {
                exclusive: name.to_string(),
                mode: *mode,
                others,
            });
        }
    }
    if !members.is_empty() && members.iter().all(|(_, m)| *m == Mode::Peerdown) {
        return Err(ProhibitedModes::AllPeerdown);
    }
    Ok(())
}

/// The cluster state string: the modes in member order joined by `-`
/// (`default-locked`, `single-peerdown`).
pub fn cluster_state(modes: impl IntoIterator<Item = Mode>) -> String {
    modes
        .into_iter()
        .map(Mode::as_str)
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use super::*;
    use Mode::*;

    fn check(modes: &[Mode]) -> Result<(), ProhibitedModes> {
        let names: Vec<String> = (0..modes.len()).map(|i| format!("n{i}")).collect();
        check_modes(names.iter().map(String::as_str).zip(modes.iter().copied()))
    }

    #[test]
    fn allowed_states() {
        for ok in [
            &[Default, Default][..],
            &[Default, Locked],
            &[Locked, Locked],
            &[Single, Locked],
            &[Single, Peerdown],
            &[Config, Locked, Peerdown],
            &[Default, Peerdown],
            &[Default, Default, Default],
        ] {
            assert_eq!(check(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn prohibited_states() {
        assert!(matches!(
            check(&[Single, Default]),
            Err(ProhibitedModes::ExclusiveWithDefault { .. })
        ));
        assert!(matches!(
            check(&[Config, Config]),
            Err(ProhibitedModes::SeveralExclusive(_))
        ));
        assert!(matches!(
            check(&[Single, Config, Locked]),
            Err(ProhibitedModes::SeveralExclusive(_))
        ));
        assert_eq!(
            check(&[Peerdown, Peerdown]),
            Err(ProhibitedModes::AllPeerdown)
        );
    }

    #[test]
    fn error_names_members_and_fix() {
        let msg = check(&[Single, Default]).unwrap_err().to_string();
        assert!(
            msg.contains("n0") && msg.contains("n1") && msg.contains("locked or peerdown"),
            "{msg}"
        );
    }

    #[test]
    fn state_string() {
        assert_eq!(cluster_state([Default, Locked]), "default-locked");
        assert_eq!(
            cluster_state([Single, Peerdown, Locked]),
            "single-peerdown-locked"
        );
    }
}
