use super::*;
use kubeha_crds::testing::status_entry as entry;

fn lease(holder: &str, epoch: i64, enter: Option<i64>, cleared: Option<&str>) -> LeaseState {
    LeaseState::for_test(holder, epoch, enter, cleared)
}

/// Facts builder: `alive` nodes with optional entries.
#[derive(Default)]
struct F(BTreeMap<String, NodeFacts>);
impl F {
    fn node(mut self, n: &str) -> Self {
        self.0.entry(n.to_owned()).or_default();
        self
    }
    fn lost(mut self, n: &str) -> Self {
        self.0.entry(n.to_owned()).or_default().fence = Fence::Heartbeat;
        self
    }
    fn peerdown(mut self, n: &str) -> Self {
        self.0.entry(n.to_owned()).or_default().fence = Fence::Peerdown;
        self
    }
    fn entry(mut self, e: ServiceNodeStatus) -> Self {
        let node = e.node.clone();
        self.0.entry(node).or_default().entry = Some(e);
        self
    }
}

fn run(cur: Option<&LeaseState>, master: Option<&str>, facts: &F) -> Handover {
    handover(Input {
        current: cur,
        master,
        standby: None,
        facts: &facts.0,
    })
}

use NodeServiceState::*;

#[test]
fn initial_placement_is_one_cleared_write() {
    let h = run(None, Some("a"), &F::default().node("a"));
    assert!(h.write && h.holder_changed && h.cleared_now);
    assert_eq!(h.lease, lease("a", 1, Some(1), Some("a")));
    assert_eq!(h.progress, Progress::Cleared);
    assert!(h.lease.holder_may_enter());
}

#[test]
fn nothing_to_say_without_a_lease_writes_nothing() {
    let h = run(None, None, &F::default());
    assert!(!h.write);
    assert_eq!(h.progress, Progress::Stopped);
}

#[test]
fn steady_state_writes_nothing() {
    let cur = lease("a", 3, Some(3), Some("a"));
    let h = run(Some(&cur), Some("a"), &F::default().node("a"));
    assert!(!h.write);
    assert_eq!(h.progress, Progress::Cleared);
}

#[test]
fn master_change_waits_for_the_previous_holder() {
    let cur = lease("a", 3, Some(3), Some("a"));
    let facts = F::default().entry(entry("a", Role::Master, Running, 3, Some(1)));
    let h = run(Some(&cur), Some("b"), &facts);
    assert!(h.write && h.holder_changed && !h.cleared_now);
    // enter-epoch stays at its old value, not cleared.
    assert_eq!(h.lease, lease("b", 4, Some(3), Some("a")));
    assert_eq!(
        h.progress,
        Progress::Waiting {
            nodes: vec!["a".into()],
            epoch: 3
        }
    );
    assert!(!h.lease.holder_may_enter());
    // Asked again before the ack: nothing new to write.
    let again = run(Some(&h.lease), Some("b"), &facts);
    assert!(!again.write);
}

#[test]
fn the_ack_clears_the_new_holder() {
    let cur = lease("b", 4, Some(3), Some("a"));
    let facts = F::default().entry(entry("a", Role::None, Stopped, 3, Some(3)));
    let h = run(Some(&cur), Some("b"), &facts);
    assert!(h.write && !h.holder_changed && h.cleared_now);
    assert_eq!(h.lease, lease("b", 4, Some(4), Some("b")));
    assert!(h.relies_on_heartbeat.is_empty());
}

#[test]
fn a_holder_that_left_its_epoch_gets_a_new_one_at_once() {
    // a was cleared at 3, fenced itself (or its monitor failed), left 3
    // and acknowledged it; placement keeps a: epoch 4, cleared now.
    let cur = lease("a", 3, Some(3), Some("a"));
    let facts = F::default().entry(entry("a", Role::None, Stopped, 3, Some(3)));
    let h = run(Some(&cur), Some("a"), &facts);
    assert!(h.write && !h.holder_changed && h.cleared_now);
    assert_eq!(h.lease, lease("a", 4, Some(4), Some("a")));
    // Running at 3 with an older acknowledgement: nothing changes.
    let facts = F::default().entry(entry("a", Role::Master, Running, 3, Some(2)));
    let h = run(Some(&cur), Some("a"), &facts);
    assert!(!h.write);
    assert_eq!(h.progress, Progress::Cleared);
}

#[test]
fn an_old_ack_is_not_an_ack() {
    let cur = lease("b", 8, Some(7), Some("a"));
    let facts = F::default().entry(entry("a", Role::Master, Running, 7, Some(3)));
    let h = run(Some(&cur), Some("b"), &facts);
    assert!(!h.write);
    assert!(matches!(h.progress, Progress::Waiting { .. }));
}

#[test]
fn a_lost_previous_holder_clears_at_once_but_must_be_confirmed() {
    let cur = lease("a", 3, Some(3), Some("a"));
    let h = run(Some(&cur), Some("b"), &F::default().lost("a"));
    assert_eq!(h.lease, lease("b", 4, Some(4), Some("b")));
    assert!(h.cleared_now);
    assert_eq!(h.relies_on_heartbeat, vec!["a".to_owned()]);
}

#[test]
fn peerdown_clears_without_confirmation() {
    let cur = lease("a", 3, Some(3), Some("a"));
    let h = run(Some(&cur), Some("b"), &F::default().peerdown("a"));
    assert!(h.cleared_now);
    assert!(h.relies_on_heartbeat.is_empty());
}

#[test]
fn master_to_nobody_bumps_the_epoch_and_keeps_the_clearance() {
    let cur = lease("a", 3, Some(3), Some("a"));
    let facts = F::default().entry(entry("a", Role::Master, Running, 3, None));
    let h = run(Some(&cur), None, &facts);
    assert_eq!(h.lease, lease("", 4, Some(3), Some("a")));
    assert_eq!(
        h.progress,
        Progress::Stopping {
            nodes: vec!["a".into()],
            epoch: 3
        }
    );
    // Once a acknowledges: stopped, and nothing to write.
    let facts = F::default().entry(entry("a", Role::None, Stopped, 3, Some(3)));
    let h2 = run(Some(&h.lease), None, &facts);
    assert!(!h2.write);
    assert_eq!(h2.progress, Progress::Stopped);
    // Placing it again later clears at once.
    let h3 = run(Some(&h.lease), Some("b"), &facts);
    assert_eq!(h3.lease, lease("b", 5, Some(5), Some("b")));
}

#[test]
fn moving_back_to_the_cleared_node_waits_for_its_own_ack() {
    // a was cleared at 3; b took the holder at 4 but waited; back to a.
    let cur = lease("b", 4, Some(3), Some("a"));
    let facts = F::default().entry(entry("a", Role::Master, Running, 3, None));
    let h = run(Some(&cur), Some("a"), &facts);
    assert_eq!(h.lease, lease("a", 5, Some(3), Some("a")));
    assert!(!h.cleared_now, "a leaves 3 first, so it acknowledges 3");
    let facts = F::default().entry(entry("a", Role::None, Stopped, 3, Some(3)));
    let h = run(Some(&h.lease), Some("a"), &facts);
    assert_eq!(h.lease, lease("a", 5, Some(5), Some("a")));
}

#[test]
fn a_refused_enter_proves_nothing_started_once_vips_expired() {
    let cur = lease("a", 3, Some(3), Some("a"));
    let refused = entry("a", Role::None, Failed, 3, Some(1));
    let mut facts = F::default().entry(refused);
    // Not yet long enough: a leave failure as far as anyone knows.
    assert_eq!(leave_failed_on(Some(&cur), &facts.0), Some("a".into()));
    assert!(!run(Some(&cur), Some("b"), &facts).cleared_now);
    facts.0.get_mut("a").unwrap().started_nothing = true;
    assert_eq!(leave_failed_on(Some(&cur), &facts.0), None);
    let h = run(Some(&cur), Some("b"), &facts);
    assert!(h.cleared_now);
    assert!(h.relies_on_heartbeat.is_empty());
}

#[test]
fn chain_of_moves_waits_for_the_last_node_that_could_enter() {
    // a cleared at 3; b holder at 4 never cleared; now c at 5.
    let cur = lease("b", 4, Some(3), Some("a"));
    let facts = F::default()
        .entry(entry("a", Role::Master, Running, 3, None))
        .node("b");
    let h = run(Some(&cur), Some("c"), &facts);
    assert_eq!(h.lease, lease("c", 5, Some(3), Some("a")));
    assert_eq!(
        h.progress,
        Progress::Waiting {
            nodes: vec!["a".into()],
            epoch: 3
        }
    );
    // b never entered, so only a's ack matters.
    let facts = F::default()
        .entry(entry("a", Role::None, Stopped, 3, Some(3)))
        .node("b");
    let h = run(Some(&h.lease), Some("c"), &facts);
    assert_eq!(h.lease, lease("c", 5, Some(5), Some("c")));
}

#[test]
fn a_node_that_moved_on_to_standby_proves_it_left() {
    let cur = lease("b", 4, Some(3), Some("a"));
    // a reports vicemaster at epoch 4: it never acts on 3 again.
    let facts = F::default().entry(entry("a", Role::Vicemaster, Stopped, 4, Some(1)));
    let h = run(Some(&cur), Some("b"), &facts);
    assert!(h.cleared_now);
    // But the same epoch as master, or running, is no proof.
    let facts = F::default().entry(entry("a", Role::Master, Running, 4, Some(1)));
    assert!(!run(Some(&cur), Some("b"), &facts).cleared_now);
    let facts = F::default().entry(entry("a", Role::None, Stopped, 3, Some(1)));
    assert!(!run(Some(&cur), Some("b"), &facts).cleared_now);
}

#[test]
fn standby_change_alone_keeps_the_epoch() {
    let cur = lease("a", 3, Some(3), Some("a"));
    let facts = F::default().node("a").node("b");
    let h = handover(Input {
        current: Some(&cur),
        master: Some("a"),
        standby: Some("b"),
        facts: &facts.0,
    });
    assert!(h.write && !h.holder_changed && !h.cleared_now);
    assert_eq!(h.lease.epoch, 3);
    assert_eq!(h.lease.standby.as_deref(), Some("b"));
    assert_eq!(h.lease.enter_epoch, Some(3));
    // The standby is never the master.
    let h = handover(Input {
        current: Some(&cur),
        master: Some("a"),
        standby: Some("a"),
        facts: &facts.0,
    });
    assert!(!h.write);
    assert_eq!(h.lease.standby, None);
}

#[test]
fn hand_edited_leases_are_treated_conservatively() {
    // No cleared-node annotation: anybody may have entered up to 5.
    let cur = lease("a", 5, Some(5), None);
    let facts = F::default()
        .entry(entry("a", Role::Master, Running, 5, None))
        .entry(entry("c", Role::None, Stopped, 2, Some(2)));
    let h = run(Some(&cur), Some("b"), &facts);
    assert_eq!(h.lease.epoch, 6);
    assert_eq!(
        h.progress,
        Progress::Waiting {
            nodes: vec!["a".into(), "c".into()],
            epoch: 5
        }
    );
    // An enter-epoch above the epoch is jumped over, never reached by
    // accident.
    let cur = lease("a", 3, Some(9), Some("a"));
    let h = run(Some(&cur), Some("b"), &F::default().lost("a"));
    assert_eq!(h.lease.epoch, 10);
    // No annotations at all on a used Lease: not "nobody".
    let cur = lease("a", 2, None, None);
    let facts = F::default().entry(entry("a", Role::Master, Running, 2, None));
    assert!(!run(Some(&cur), Some("b"), &facts).cleared_now);
    // A fresh hand-made Lease with epoch 0: nobody was cleared.
    let cur = lease("", 0, None, None);
    assert!(run(Some(&cur), Some("b"), &F::default()).cleared_now);
}

#[test]
fn a_lost_lease_is_assumed_from_the_status() {
    let status = HAServiceStatus {
        active_node: Some("a".into()),
        epoch: Some(6),
        nodes: vec![
            entry("a", Role::Master, Running, 7, Some(3)),
            entry("b", Role::Vicemaster, Stopped, 5, None),
        ],
        ..Default::default()
    };
    let assumed = assumed_after_loss(&status).unwrap();
    assert_eq!(assumed, lease("", 7, Some(7), Some("a")));
    // Whoever comes next gets a fresh epoch and waits for a.
    let facts = F::default()
        .entry(status.nodes[0].clone())
        .entry(status.nodes[1].clone());
    let h = run(Some(&assumed), Some("a"), &facts);
    assert_eq!(h.lease.epoch, 8);
    assert!(h.write && !h.cleared_now);
    // a leaves (the Lease vanished, so it has no role): cleared.
    let facts = F::default().entry(entry("a", Role::None, Stopped, 7, Some(7)));
    assert!(run(Some(&assumed), Some("a"), &facts).cleared_now);
    // Never placed: nothing assumed, even with agents' first reports.
    assert_eq!(assumed_after_loss(&HAServiceStatus::default()), None);
    let fresh = HAServiceStatus {
        nodes: vec![entry("a", Role::None, Stopped, 0, None)],
        ..Default::default()
    };
    assert_eq!(assumed_after_loss(&fresh), None);
    // Nobody published as active: anybody who reported must prove.
    let status = HAServiceStatus {
        epoch: Some(4),
        nodes: vec![entry("b", Role::None, Stopped, 4, Some(4))],
        ..Default::default()
    };
    let assumed = assumed_after_loss(&status).unwrap();
    let facts = F::default().entry(status.nodes[0].clone()).node("c");
    let h = run(Some(&assumed), Some("c"), &facts);
    assert!(h.cleared_now, "b acknowledged 4; c never reported");
}

#[test]
fn leave_failed_is_the_cleared_node_failed_without_ack() {
    let cur = lease("a", 3, Some(3), Some("a"));
    let failed = F::default().entry(entry("a", Role::None, Failed, 3, Some(1)));
    assert_eq!(leave_failed_on(Some(&cur), &failed.0), Some("a".into()));
    // Failed but acknowledged (enter failed, leave succeeded): not.
    let ok = F::default().entry(entry("a", Role::None, Failed, 3, Some(3)));
    assert_eq!(leave_failed_on(Some(&cur), &ok.0), None);
    // An old failure from before this clearance: not.
    let old = F::default().entry(entry("a", Role::None, Failed, 2, Some(1)));
    assert_eq!(leave_failed_on(Some(&cur), &old.0), None);
    assert_eq!(leave_failed_on(None, &failed.0), None);
    // And the handover waits for it.
    let h = run(Some(&cur), Some("b"), &failed);
    assert!(!h.cleared_now);
}

#[test]
fn lease_round_trip() {
    let state = LeaseState {
        holder: Some("a".into()),
        epoch: 4,
        standby: Some("b".into()),
        enter_epoch: Some(3),
        cleared_node: Some("c".into()),
    };
    let l = Lease {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            annotations: Some(state.annotations()),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: state.holder.clone(),
            lease_transitions: Some(state.lease_transitions()),
            ..Default::default()
        }),
    };
    assert_eq!(LeaseState::from_lease(&l), state);
    // Empty strings are nobody; garbage enter-epoch is absent.
    let mut l = l;
    l.spec.as_mut().unwrap().holder_identity = Some(String::new());
    l.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(leases::ENTER_EPOCH_ANNOTATION.into(), "x".into());
    let s = LeaseState::from_lease(&l);
    assert_eq!((s.holder, s.enter_epoch), (None, None));
}

// ------------------------------------------------------------------
// Simulation: random placements, agents that lag, fail to leave, lose
// their heartbeat and come back; at no step may two nodes run.

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Debug, Default)]
struct Agent {
    /// The epoch it runs the service at (holds the VIPs).
    running: Option<i64>,
    role: Role,
    state: Option<NodeServiceState>,
    epoch: i64,
    acked: Option<i64>,
    failed_epoch: Option<i64>,
    /// Cut off: does nothing, will be fenced.
    partitioned: bool,
    /// The operator sees the heartbeat Lost (only after the fence).
    lost: bool,
    /// What the operator sees of it (reports lag).
    reported: Option<ServiceNodeStatus>,
    /// The last enter was refused before starting anything.
    refused: bool,
    /// `refused` as last reported.
    reported_refused: bool,
}

impl Agent {
    fn snapshot(&self, name: &str) -> ServiceNodeStatus {
        ServiceNodeStatus {
            node: name.to_owned(),
            role: self.role,
            state: self.state.unwrap_or(Stopped),
            epoch: Some(self.epoch),
            acked_epoch: self.acked,
            fail_count: 0,
            last_failure_time: None,
            unclean_epoch: None,
            permanent_failure: false,
            hooks: Vec::new(),
            refused: None,
        }
    }

    /// One reconcile of the agent against the Lease it sees.
    fn sync(&mut self, name: &str, lease: &LeaseState, rng: &mut Rng) {
        if self.partitioned {
            return;
        }
        let holder = lease.holder.as_deref() == Some(name);
        let standby = lease.standby.as_deref() == Some(name);
        if let Some(e) = self.running
            && !(holder && lease.holder_may_enter())
        {
            // Not (or not yet) cleared as master: leave; sometimes the
            // leave hook fails.
            if rng.below(6) == 0 {
                self.role = Role::None;
                self.state = Some(Failed);
                // still running: the service may be up here
            } else {
                self.running = None;
                self.role = Role::None;
                self.state = Some(Stopped);
                self.acked = Some(e);
            }
            return;
        }
        if holder
            && lease.holder_may_enter()
            && self.running.is_none()
            && self.failed_epoch != Some(lease.epoch)
        {
            self.refused = false;
            if rng.below(10) == 0 {
                // VIPs refused: nothing started, no ack.
                self.epoch = lease.epoch;
                self.failed_epoch = Some(lease.epoch);
                self.role = Role::None;
                self.state = Some(Failed);
                self.refused = true;
            } else if rng.below(8) == 0 {
                // Enter fails, leave succeeds.
                self.epoch = lease.epoch;
                self.acked = Some(lease.epoch);
                self.failed_epoch = Some(lease.epoch);
                self.role = Role::None;
                self.state = Some(Failed);
            } else {
                self.running = Some(lease.epoch);
                self.epoch = lease.epoch;
                self.role = Role::Master;
                self.state = Some(Running);
            }
            return;
        }
        if holder && self.running.is_some() && lease.holder_may_enter() {
            // Same node cleared again at a newer epoch: keeps running.
            self.epoch = lease.epoch;
            return;
        }
        if standby && self.running.is_none() && self.role != Role::Vicemaster {
            self.role = Role::Vicemaster;
            self.epoch = lease.epoch;
            if self.state != Some(Failed) {
                self.state = Some(Stopped);
            }
        }
    }
}

fn simulate(seed: u64, steps: usize) {
    let names = ["a", "b", "c"];
    let mut rng = Rng(seed | 1);
    let mut agents: BTreeMap<&str, Agent> = names.iter().map(|n| (*n, Agent::default())).collect();
    let mut lease: Option<LeaseState> = None;
    let mut peerdown: BTreeMap<&str, bool> = BTreeMap::new();
    for step in 0..steps {
        match rng.below(10) {
            // The operator reconciles with an arbitrary placement.
            0..=2 => {
                let pick = rng.below(4) as usize;
                let master = names.get(pick).copied();
                let standby = names.get(rng.below(4) as usize).copied();
                let facts: BTreeMap<String, NodeFacts> = names
                    .iter()
                    .map(|n| {
                        let a = &agents[n];
                        let fence = if peerdown.get(n).copied().unwrap_or(false) {
                            Fence::Peerdown
                        } else if a.lost {
                            Fence::Heartbeat
                        } else {
                            Fence::None
                        };
                        (
                            n.to_string(),
                            NodeFacts {
                                fence,
                                entry: a.reported.clone(),
                                started_nothing: a.reported_refused,
                            },
                        )
                    })
                    .collect();
                let h = handover(Input {
                    current: lease.as_ref(),
                    master,
                    standby,
                    facts: &facts,
                });
                if h.write {
                    lease = Some(h.lease);
                }
            }
            // An agent acts on the Lease.
            3..=5 => {
                let n = names[rng.below(3) as usize];
                if let Some(l) = &lease {
                    agents.get_mut(n).unwrap().sync(n, l, &mut rng);
                }
            }
            // An agent reports.
            6 | 7 => {
                let n = names[rng.below(3) as usize];
                let a = agents.get_mut(n).unwrap();
                if !a.partitioned {
                    a.reported = Some(a.snapshot(n));
                    a.reported_refused = a.refused;
                }
            }
            // Partition: the agent fences itself (drops everything)
            // before the operator can see it Lost.
            8 => {
                let n = names[rng.below(3) as usize];
                let a = agents.get_mut(n).unwrap();
                if !a.partitioned {
                    a.partitioned = true;
                } else if !a.lost {
                    a.running = None; // self-fence at RD
                    a.role = Role::None;
                    a.state = Some(Failed);
                    a.failed_epoch = Some(a.epoch);
                    a.lost = true; // the operator sees it only after D + skew
                } else if rng.below(3) == 0 {
                    // An admin certifies it powered off.
                    peerdown.insert(n, true);
                }
            }
            // A fenced node returns.
            _ => {
                let n = names[rng.below(3) as usize];
                let a = agents.get_mut(n).unwrap();
                if a.lost {
                    a.partitioned = false;
                    a.lost = false;
                    peerdown.insert(n, false);
                }
            }
        }
        let running: Vec<&str> = agents
            .iter()
            .filter(|(_, a)| a.running.is_some())
            .map(|(n, _)| *n)
            .collect();
        assert!(
            running.len() <= 1,
            "seed {seed} step {step}: {running:?} both run; lease {lease:?}; agents {agents:#?}"
        );
    }
}

#[test]
fn at_no_step_could_two_nodes_both_be_cleared() {
    for seed in 1..400u64 {
        simulate(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), 400);
    }
}

#[test]
fn the_simulation_makes_progress() {
    // Without failures the protocol moves the service: check that the
    // scenario above is not vacuous (some clearance happens often).
    let facts = F::default().node("a").node("b");
    let mut lease = run(None, Some("a"), &facts).lease;
    for (i, target) in ["b", "a", "b"].iter().enumerate() {
        let prev = lease.cleared_node.clone().unwrap();
        let epoch = lease.enter_epoch.unwrap();
        let waiting = run(Some(&lease), Some(target), &facts).lease;
        assert!(!waiting.holder_may_enter(), "step {i}");
        let acked = F::default()
            .entry(entry(&prev, Role::None, Stopped, epoch, Some(epoch)))
            .node(target);
        lease = run(Some(&waiting), Some(target), &acked).lease;
        assert!(lease.holder_may_enter(), "step {i}");
        assert_eq!(lease.holder.as_deref(), Some(*target));
    }
    assert_eq!(lease.epoch, 4);
}
