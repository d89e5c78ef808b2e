//! The primary node of a service and the names of the four role changes
//! (takeover, takeback, giveaway, giveback), shared by the agent (hook
//! environment, metrics, Events) and the operator (Events).

use serde::{Deserialize, Serialize};

use crate::HAServiceSpec;
use crate::cluster::{HACluster, Placement};

/// Member names in the order placement tries them when it has no
/// preferred node: duplicates dropped (the first wins), then sorted by
/// name under `Alphabetical`, kept in the order given under `Ordered`.
pub fn placement_order<'a>(
    placement: Placement,
    members: impl IntoIterator<Item = &'a str>,
) -> Vec<&'a str> {
    let mut out: Vec<&'a str> = Vec::new();
    for name in members {
        if !out.contains(&name) {
            out.push(name);
        }
    }
    if placement == Placement::Alphabetical {
        out.sort_unstable();
    }
    out
}

/// The actual members of `cluster` as an agent can know them without
/// reading Node objects, in placement order ([`placement_order`]): the
/// listed nodes, then the nodes the operator reports in `status.members`
/// (those the selector matched; the operator resolves the selector).
pub fn known_members(cluster: &HACluster) -> Vec<String> {
    let listed = cluster.spec.members.nodes.iter().map(|m| m.name.as_str());
    let reported = cluster
        .status
        .iter()
        .flat_map(|s| s.members.iter().map(|m| m.node.as_str()));
    placement_order(cluster.spec.placement, listed.chain(reported))
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// The primary node of a service: the node placement puts first among
/// the cluster's actual members when all are eligible. That is its first
/// preferred node that is a member, else the first of `members`, which
/// must be in placement order ([`placement_order`], [`known_members`]).
/// `None` without members.
pub fn primary_node<'a>(
    spec: &HAServiceSpec,
    members: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let members: Vec<&'a str> = members.into_iter().collect();
    spec.preferred_nodes
        .iter()
        .find_map(|p| members.iter().find(|m| **m == p.as_str()).copied())
        .or_else(|| members.first().copied())
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
    fn the_primary_is_the_first_preferred_member_else_the_first_in_placement_order() {
        let members = ["n2", "n1"];
        // A preferred node that is no member is skipped, as placement does.
        assert_eq!(primary_node(&spec(&["n3", "n1"]), members), Some("n1"));
        assert_eq!(primary_node(&spec(&["n3"]), members), Some("n2"));
        assert_eq!(primary_node(&spec(&[]), members), Some("n2"));
        assert_eq!(primary_node(&spec(&["n1"]), []), None);
        // Placement order: sorted under Alphabetical, as listed under Ordered.
        let listed = ["n2", "n3", "n2", "n1"];
        assert_eq!(
            placement_order(Placement::Alphabetical, listed),
            ["n1", "n2", "n3"]
        );
        assert_eq!(
            placement_order(Placement::Ordered, listed),
            ["n2", "n3", "n1"]
        );
        let alpha = placement_order(Placement::Alphabetical, listed);
        assert_eq!(primary_node(&spec(&[]), alpha), Some("n1"));
    }

    #[test]
    fn selected_members_come_from_the_status_after_the_listed_ones() {
        use crate::cluster::{HAClusterStatus, HeartbeatState, MemberStatus};
        use crate::mode::Mode;
        let cluster_spec = crate::testing::cluster_spec(crate::testing::members(
            &[("node-b", Mode::Default)],
            Some(&[("ha", "yes")]),
        ));
        let mut cluster = HACluster::new("c", cluster_spec);
        let member = |n: &str| MemberStatus {
            node: n.into(),
            heartbeat: HeartbeatState::Alive,
            mode: Mode::Default,
            roles: Vec::new(),
        };
        // Before the operator's first status: the listed node only.
        assert_eq!(known_members(&cluster), ["node-b"]);
        cluster.status = Some(HAClusterStatus {
            members: vec![member("node-b"), member("node-c"), member("node-a")],
            ..Default::default()
        });
        cluster.spec.placement = Placement::Ordered;
        assert_eq!(known_members(&cluster), ["node-b", "node-c", "node-a"]);
        cluster.spec.placement = Placement::Alphabetical;
        assert_eq!(known_members(&cluster), ["node-a", "node-b", "node-c"]);
        // A cluster of selected members only has a primary too.
        cluster.spec.members.nodes.clear();
        let known = known_members(&cluster);
        assert_eq!(
            primary_node(&spec(&[]), known.iter().map(String::as_str)),
            Some("node-a")
        );
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
