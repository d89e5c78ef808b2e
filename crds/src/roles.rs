//! The primary node of a service and the names of the four role changes
//! (takeover, takeback, giveaway, giveback), shared by the agent (hook
//! environment, metrics, Events) and the operator (Events).

use serde::{Deserialize, Serialize};

use crate::HAServiceSpec;

/// The primary node of a service: its first preferred node, else the first
/// of the cluster's `members` (in the order given).
pub fn primary_node<'a>(
    spec: &'a HAServiceSpec,
    mut members: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    spec.preferred_nodes
        .first()
        .map(String::as_str)
        .or_else(|| members.next())
}

/// The kind of role change, as the classic failover scripts name it
/// (exported to scripts as `KUBEHA_TRANSITION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transition {
    /// Start the service on a backup node.
    TakeOver,
    /// Start the service on its primary node.
    TakeBack,
    /// Stop the service on its primary node.
    GiveAway,
    /// Stop the service on a backup node.
    GiveBack,
}

impl Transition {
    /// Entering on the primary node is a takeback, on a backup node a
    /// takeover; leaving on the primary node is a giveaway, on a backup
    /// node a giveback.
    pub fn of(entering: bool, on_primary: bool) -> Self {
        match (entering, on_primary) {
            (true, true) => Transition::TakeBack,
            (true, false) => Transition::TakeOver,
            (false, true) => Transition::GiveAway,
            (false, false) => Transition::GiveBack,
        }
    }

    /// `takeover`, `takeback`, `giveaway` or `giveback` (the hook
    /// environment's and the metrics' word).
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::TakeOver => "takeover",
            Transition::TakeBack => "takeback",
            Transition::GiveAway => "giveaway",
            Transition::GiveBack => "giveback",
        }
    }

    /// `TakeOver`, `TakeBack`, `GiveAway` or `GiveBack` (the Event reason).
    pub fn reason(self) -> &'static str {
        match self {
            Transition::TakeOver => "TakeOver",
            Transition::TakeBack => "TakeBack",
            Transition::GiveAway => "GiveAway",
            Transition::GiveBack => "GiveBack",
        }
    }
}

impl std::fmt::Display for Transition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(preferred: &[&str]) -> HAServiceSpec {
        let mut spec = crate::testing::service_spec("c", &["198.18.0.100/24"]);
        spec.preferred_nodes = preferred.iter().map(|n| n.to_string()).collect();
        spec
    }

    #[test]
    fn the_primary_is_the_first_preferred_node_else_the_first_member() {
        let members = ["n2", "n1"];
        assert_eq!(
            primary_node(&spec(&["n3", "n1"]), members.into_iter()),
            Some("n3")
        );
        assert_eq!(primary_node(&spec(&[]), members.into_iter()), Some("n2"));
        assert_eq!(primary_node(&spec(&[]), std::iter::empty()), None);
    }

    #[test]
    fn each_role_change_has_one_word_and_one_reason() {
        let all = [(true, true), (true, false), (false, true), (false, false)]
            .map(|(entering, primary)| Transition::of(entering, primary));
        assert_eq!(
            all.map(Transition::as_str),
            ["takeback", "takeover", "giveaway", "giveback"]
        );
        assert_eq!(
            all.map(Transition::reason),
            ["TakeBack", "TakeOver", "GiveAway", "GiveBack"]
        );
        // The word is the serialized form.
        for t in all {
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
    }
}
