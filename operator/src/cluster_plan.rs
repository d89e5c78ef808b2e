//! What one reconcile of an HACluster decides, as a pure function: the
//! status (members with heartbeat, mode and roles; `ready`, `state`,
//! `servicesActive`; conditions), prohibited mode combinations the API
//! server could not see (members picked by a selector), and the spec patch
//! that erases a `peerdown` mark when that node heartbeats again.
//!
//! # Returning peers
//!
//! A member in mode `peerdown` whose heartbeat Lease the operator sees
//! change *after* it first saw the mark has come back: the certification
//! that it is powered off is false from then on. The operator sets that
//! member to `default` and also every listed member in `single` or `config`
//! (those modes require every other member to be locked or peerdown, so
//! leaving them would create a prohibited state); `locked` members stay
//! locked, since an admin put them there. Placement then carries on: the
//! returned node is eligible once Alive. When that reset an exclusive
//! member, the patch also stops the cluster (`spec.stopped`): StorNext
//! shuts its services down when a peerdown peer returns, and returning from
//! `config` to `default` needs the services stopped first. An admin starts
//! it again with `kubectl ha start`.
//!
//! # Prohibited states are moved, not frozen
//!
//! A `locked` member whose heartbeat expired (Lost or Fenced) counts as
//! `default`, as StorNext's peer assumes of a locked node it cannot reach:
//! beside a member in `single` or `config` that is a prohibited state. So is
//! an exclusive member beside a `default` member picked by the selector
//! (the API server's CEL rules see only the listed ones). Either way the
//! operator resets every listed exclusive member to `default` (monitoring
//! on again) in the same kind of tested JSON patch, and a `config` member
//! also stops the cluster. That is safe: nothing is moved or entered by the
//! repair itself (the locked member is not eligible, and a Lost one has
//! fenced itself), and stopping never gives a VIP to a second node.

use std::collections::{BTreeMap, BTreeSet};

use kubeha_crds::Mode;
use kubeha_crds::cluster::{HeartbeatState, MemberStatus, ServiceRole};
use kubeha_crds::mode::{check_modes, cluster_state};
use kubeha_crds::service::{Phase, Role};
use serde_json::json;

use crate::conditions::{Cond, DEGRADED, READY, RECONCILING, STALLED};
use crate::heartbeat_view::with_mode;
use crate::members::Member;

/// What the cluster reconciler knows of one service of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSummary {
    /// `namespace/name`.
    pub key: String,
    /// Its phase.
    pub phase: Option<Phase>,
    /// Its master (service Lease holder).
    pub master: Option<String>,
    /// Its standby.
    pub standby: Option<String>,
}

/// What the reconciler gathered about one cluster.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    /// The resolved members, in member order.
    pub members: &'a [Member],
    /// Each member's heartbeat by the operator's clock, before modes.
    pub heartbeats: &'a BTreeMap<String, HeartbeatState>,
    /// The cluster's services.
    pub services: &'a [ServiceSummary],
    /// `peerdown` members seen heartbeating after the mark.
    pub returned: &'a BTreeSet<String>,
    /// Whether agents can enter under the cluster's timing
    /// ([`kubeha_crds::timing`]); false only for a cluster stored before
    /// the API server checked it.
    pub timing_lets_agents_enter: bool,
    /// `spec.stopped`: the cluster is stopped on purpose.
    pub stopped: bool,
}

/// The operator-owned part of an HACluster status.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusFields {
    /// Alive members / all members.
    pub ready: String,
    /// The modes in member order joined by `-`.
    pub state: String,
    /// Services that are Active.
    pub services_active: i32,
    /// One entry per member.
    pub members: Vec<MemberStatus>,
    /// Ready, Degraded, Reconciling, Stalled.
    pub conditions: Vec<Cond>,
}

/// The result of [`plan`].
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The status to publish.
    pub status: StatusFields,
    /// The prohibited-state message, when the modes are not allowed.
    pub prohibited: Option<String>,
    /// A JSON patch (RFC 6902, with tests) on the HACluster spec erasing
    /// peerdown marks; `None` when nothing returned.
    pub mode_patch: Option<serde_json::Value>,
    /// Members whose mark the patch erases.
    pub returned: Vec<String>,
    /// Listed members in `single` or `config` the patch resets to
    /// `default`, with the mode they had.
    pub reset: Vec<(String, Mode)>,
    /// Whether the patch also stops the cluster (`spec.stopped`).
    pub stops: bool,
}

/// The modes as the rules judge them: a `locked` member whose heartbeat
/// expired counts as `default` (it cannot be asked whether it is stopped).
pub fn effective_mode(mode: Mode, heartbeat: Option<HeartbeatState>) -> Mode {
    match (mode, heartbeat) {
        (Mode::Locked, Some(HeartbeatState::Lost | HeartbeatState::Fenced)) => Mode::Default,
        (mode, _) => mode,
    }
}

/// Decides the status and mode repairs of one cluster.
pub fn plan(f: &Facts<'_>) -> Plan {
    let prohibited = check_modes(f.members.iter().map(|m| (m.name.as_str(), m.mode)))
        .err()
        .map(|e| e.to_string());

    let heartbeat = |m: &Member| {
        with_mode(
            f.heartbeats
                .get(&m.name)
                .copied()
                .unwrap_or(HeartbeatState::Stopping),
            m.mode,
        )
    };
    let members: Vec<MemberStatus> = f
        .members
        .iter()
        .map(|m| {
            let mut roles: Vec<ServiceRole> = Vec::new();
            for s in f.services {
                if s.master.as_deref() == Some(&m.name) {
                    roles.push(ServiceRole {
                        service: s.key.clone(),
                        role: Role::Master,
                    });
                } else if s.standby.as_deref() == Some(&m.name) {
                    roles.push(ServiceRole {
                        service: s.key.clone(),
                        role: Role::Vicemaster,
                    });
                }
            }
            MemberStatus {
                node: m.name.clone(),
                heartbeat: heartbeat(m),
                mode: m.mode,
                roles,
            }
        })
        .collect();
    let alive = members
        .iter()
        .filter(|m| m.heartbeat == HeartbeatState::Alive)
        .count();
    let services_active = f
        .services
        .iter()
        .filter(|s| s.phase == Some(Phase::Active))
        .count();

    // Peerdown marks to erase.
    let returned: Vec<&Member> = f
        .members
        .iter()
        .filter(|m| m.listed && m.mode == Mode::Peerdown && f.returned.contains(&m.name))
        .collect();
    let effective = check_modes(f.members.iter().map(|m| {
        (
            m.name.as_str(),
            effective_mode(m.mode, f.heartbeats.get(&m.name).copied()),
        )
    }))
    .err()
    .map(|e| e.to_string());
    let prohibited = prohibited.or(effective);
    let repair = !returned.is_empty() || prohibited.is_some();
    let reset: Vec<(String, Mode)> = f
        .members
        .iter()
        .filter(|m| repair && m.listed && m.index.is_some() && m.mode.is_exclusive())
        .map(|m| (m.name.clone(), m.mode))
        .collect();
    let stops = !f.stopped
        && reset
            .iter()
            .any(|(_, mode)| *mode == Mode::Config || !returned.is_empty());
    let mode_patch = (!returned.is_empty() || !reset.is_empty()).then(|| {
        let mut ops = Vec::new();
        let targets = f.members.iter().filter(|m| {
            m.listed && (returned.iter().any(|r| r.name == m.name) || m.mode.is_exclusive())
        });
        if stops {
            ops.push(json!({"op": "add", "path": "/spec/stopped", "value": true}));
        }
        for m in targets {
            let Some(i) = m.index else { continue };
            let base = format!("/spec/members/nodes/{i}");
            ops.push(json!({"op": "test", "path": format!("{base}/name"), "value": m.name}));
            ops.push(
                json!({"op": "test", "path": format!("{base}/mode"), "value": m.mode.as_str()}),
            );
            ops.push(json!({"op": "replace", "path": format!("{base}/mode"), "value": "default"}));
        }
        serde_json::Value::Array(ops)
    });

    let mut conditions = Vec::new();
    conditions.push(match (&prohibited, f.members.is_empty()) {
        (Some(msg), _) => Cond::yes(STALLED, "ProhibitedModes", msg.clone()),
        (None, _) if !f.timing_lets_agents_enter => Cond::yes(
            STALLED,
            "TimingNeverEnters",
            kubeha_crds::timing::ENTRY_RULE_MESSAGE,
        ),
        (None, true) => Cond::yes(
            STALLED,
            "NoMembers",
            "no member nodes: list them in spec.members.nodes or label nodes to match spec.members.selector",
        ),
        (None, false) => Cond::no(STALLED, "Progressing", ""),
    });
    let can_run = members
        .iter()
        .any(|m| m.heartbeat == HeartbeatState::Alive && m.mode.allows_services());
    conditions.push(if f.stopped {
        Cond::no(
            READY,
            "ClusterStopped",
            "the cluster is stopped (spec.stopped): no service runs; start it with kubectl ha start",
        )
    } else if can_run && prohibited.is_none() {
        Cond::yes(
            READY,
            "MembersAlive",
            format!("{alive}/{} members alive", members.len()),
        )
    } else {
        Cond::no(
            READY,
            "NoMemberCanRun",
            "no member is alive in a mode that allows services",
        )
    });
    let down: Vec<String> = members
        .iter()
        .filter(|m| m.heartbeat != HeartbeatState::Alive)
        .map(|m| format!("{}: {:?}", m.node, m.heartbeat))
        .collect();
    conditions.push(if down.is_empty() {
        Cond::no(DEGRADED, "AllAlive", "")
    } else {
        Cond::yes(DEGRADED, "MembersDown", down.join(", "))
    });
    conditions.push(if returned.is_empty() {
        Cond::no(RECONCILING, "Settled", "")
    } else {
        Cond::yes(
            RECONCILING,
            "PeerReturned",
            format!(
                "{} heartbeat again: erasing the peerdown mark",
                returned
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    });

    Plan {
        status: StatusFields {
            ready: format!("{alive}/{}", members.len()),
            state: cluster_state(f.members.iter().map(|m| m.mode)),
            services_active: i32::try_from(services_active).unwrap_or(i32::MAX),
            members,
            conditions,
        },
        prohibited,
        mode_patch,
        returned: returned.iter().map(|m| m.name.clone()).collect(),
        reset,
        stops,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use HeartbeatState::*;

    fn member(name: &str, mode: Mode, index: Option<usize>) -> Member {
        Member {
            name: name.into(),
            mode,
            listed: index.is_some(),
            index,
        }
    }

    fn beats(pairs: &[(&str, HeartbeatState)]) -> BTreeMap<String, HeartbeatState> {
        pairs.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    }

    fn cond<'a>(p: &'a Plan, t: &str) -> &'a Cond {
        p.status.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn status_of_a_healthy_cluster() {
        let members = [
            member("a", Mode::Default, Some(0)),
            member("b", Mode::Locked, Some(1)),
        ];
        let services = [
            ServiceSummary {
                key: "ns/x".into(),
                phase: Some(Phase::Active),
                master: Some("a".into()),
                standby: Some("b".into()),
            },
            ServiceSummary {
                key: "ns/y".into(),
                phase: Some(Phase::Starting),
                master: Some("b".into()),
                standby: None,
            },
        ];
        let p = plan(&Facts {
            members: &members,
            heartbeats: &beats(&[("a", Alive), ("b", Alive)]),
            services: &services,
            returned: &BTreeSet::new(),
            timing_lets_agents_enter: true,
            stopped: false,
        });
        assert_eq!(p.status.ready, "2/2");
        assert_eq!(p.status.state, "default-locked");
        assert_eq!(p.status.services_active, 1);
        assert_eq!(p.status.members[0].roles.len(), 1);
        assert_eq!(p.status.members[1].roles.len(), 2);
        assert_eq!(p.status.members[1].roles[0].role, Role::Vicemaster);
        assert!(cond(&p, READY).status);
        assert!(!cond(&p, DEGRADED).status);
        assert!(!cond(&p, STALLED).status);
        assert_eq!(p.mode_patch, None);
    }

    #[test]
    fn a_timing_no_agent_can_enter_under_stalls_the_cluster() {
        let members = [member("a", Mode::Default, Some(0))];
        let p = plan(&Facts {
            members: &members,
            heartbeats: &beats(&[("a", Alive)]),
            services: &[],
            returned: &BTreeSet::new(),
            timing_lets_agents_enter: false,
            stopped: false,
        });
        let stalled = cond(&p, STALLED);
        assert!(stalled.status);
        assert_eq!(stalled.reason, "TimingNeverEnters");
        assert!(
            stalled.message.contains("raise leaseDurationMs"),
            "{stalled:?}"
        );
    }

    #[test]
    fn lost_and_peerdown_members() {
        let members = [
            member("a", Mode::Single, Some(0)),
            member("b", Mode::Peerdown, Some(1)),
            member("c", Mode::Default, None),
        ];
        let p = plan(&Facts {
            members: &members,
            heartbeats: &beats(&[("a", Alive), ("b", Lost)]),
            services: &[],
            returned: &BTreeSet::new(),
            timing_lets_agents_enter: true,
            stopped: false,
        });
        assert_eq!(p.status.members[1].heartbeat, Fenced, "peerdown certifies");
        assert_eq!(p.status.members[2].heartbeat, Stopping, "never seen");
        assert_eq!(p.status.ready, "1/3");
        // single + a selected default member: prohibited, the API could not see it.
        assert!(
            p.prohibited
                .as_deref()
                .unwrap()
                .contains("locked or peerdown")
        );
        assert!(cond(&p, STALLED).status);
        assert!(!cond(&p, READY).status);
        assert!(cond(&p, DEGRADED).status);
    }

    #[test]
    fn a_returning_peer_is_erased_with_the_exclusive_member() {
        let members = [
            member("a", Mode::Single, Some(0)),
            member("b", Mode::Peerdown, Some(1)),
            member("c", Mode::Locked, Some(2)),
        ];
        let p = plan(&Facts {
            members: &members,
            heartbeats: &beats(&[("a", Alive), ("b", Alive), ("c", Alive)]),
            services: &[],
            returned: &BTreeSet::from(["b".to_owned()]),
            timing_lets_agents_enter: true,
            stopped: false,
        });
        assert_eq!(p.returned, vec!["b".to_owned()]);
        let patch = p.mode_patch.clone().unwrap();
        let ops = patch.as_array().unwrap();
        assert_eq!(ops.len(), 7, "{patch}");
        assert_eq!(ops[0]["path"], "/spec/stopped", "the services stop");
        assert_eq!(ops[0]["value"], true);
        assert_eq!(ops[1]["path"], "/spec/members/nodes/0/name");
        assert_eq!(ops[2]["value"], "single");
        assert_eq!(ops[6]["path"], "/spec/members/nodes/1/mode");
        assert_eq!(ops[6]["value"], "default");
        assert!(p.stops);
        assert_eq!(p.reset, vec![("a".to_owned(), Mode::Single)]);
        assert!(
            !patch.to_string().contains("nodes/2"),
            "locked stays locked"
        );
        assert!(cond(&p, RECONCILING).status);
        // Parses as a JSON patch.
        let _: json_patch_check::Ops = serde_json::from_value(patch).unwrap();
    }

    /// Minimal shape check of the RFC 6902 operations.
    mod json_patch_check {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        pub struct Op {
            pub op: String,
            pub path: String,
            pub value: serde_json::Value,
        }
        pub type Ops = Vec<Op>;
    }

    #[test]
    fn a_lost_locked_peer_counts_as_default_and_the_exclusive_member_is_reset() {
        for (mode, stops) in [(Mode::Single, false), (Mode::Config, true)] {
            let members = [
                member("a", mode, Some(0)),
                member("b", Mode::Locked, Some(1)),
            ];
            let facts = |b: HeartbeatState, stopped: bool| {
                plan(&Facts {
                    members: &members,
                    heartbeats: &beats(&[("a", Alive), ("b", b)]),
                    services: &[],
                    returned: &BTreeSet::new(),
                    timing_lets_agents_enter: true,
                    stopped,
                })
            };
            let alive = facts(Alive, false);
            assert_eq!(alive.mode_patch, None, "{mode}-locked is allowed");
            assert_eq!(alive.prohibited, None);
            let p = facts(Lost, false);
            let msg = p.prohibited.as_deref().unwrap();
            assert!(
                msg.contains('a') && msg.contains("locked or peerdown"),
                "{msg}"
            );
            assert_eq!(p.reset, vec![("a".to_owned(), mode)]);
            assert_eq!(p.stops, stops, "{mode}: only config must stop first");
            let patch = p.mode_patch.unwrap().to_string();
            assert!(patch.contains("/spec/members/nodes/0/mode"), "{patch}");
            assert!(!patch.contains("nodes/1"), "locked stays locked: {patch}");
            assert_eq!(patch.contains("/spec/stopped"), stops, "{patch}");
            // Already stopped: no second stop in the patch.
            assert!(!facts(Lost, true).stops);
        }
    }

    #[test]
    fn an_exclusive_member_beside_a_selected_default_member_is_reset() {
        let members = [
            member("a", Mode::Single, Some(0)),
            member("c", Mode::Default, None),
        ];
        let p = plan(&Facts {
            members: &members,
            heartbeats: &beats(&[("a", Alive), ("c", Alive)]),
            services: &[],
            returned: &BTreeSet::new(),
            timing_lets_agents_enter: true,
            stopped: false,
        });
        assert_eq!(p.reset, vec![("a".to_owned(), Mode::Single)]);
        assert!(!p.stops, "single returns to default without a stop");
        assert!(p.mode_patch.is_some());
    }

    #[test]
    fn a_stopped_cluster_is_not_ready_and_says_how_to_start() {
        let members = [member("a", Mode::Default, Some(0))];
        let p = plan(&Facts {
            members: &members,
            heartbeats: &beats(&[("a", Alive)]),
            services: &[],
            returned: &BTreeSet::new(),
            timing_lets_agents_enter: true,
            stopped: true,
        });
        let ready = cond(&p, READY);
        assert!(!ready.status);
        assert_eq!(ready.reason, "ClusterStopped");
        assert!(ready.message.contains("kubectl ha start"));
    }

    #[test]
    fn no_members_is_stalled() {
        let p = plan(&Facts {
            members: &[],
            heartbeats: &BTreeMap::new(),
            services: &[],
            returned: &BTreeSet::new(),
            timing_lets_agents_enter: true,
            stopped: false,
        });
        assert_eq!(p.status.ready, "0/0");
        assert_eq!(cond(&p, STALLED).reason, "NoMembers");
    }
}
