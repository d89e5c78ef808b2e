//! Annotations an admin (or `kubectl ha`) puts on an HAService to ask for
//! the actions of the classic HA managers. They live in the metadata, not
//! the spec: they are requests to the operator and the agents, not part of
//! the application team's desired state, and setting one never bumps the
//! generation.

/// Annotation on an HAService: the node the service should run on, like
/// Pacemaker's `crm resource move`. A location preference that stays until
/// it is removed: while the named node is eligible (a member whose mode
/// allows services, heartbeat Alive, not cordoned, not failed for this
/// service) the operator puts it first in the service's candidate order and
/// moves the service there at once, whatever the failback policy (as with
/// `Automatic` failback and no delay, toward that node only), through the
/// ordinary handover: the current master leaves and acknowledges before the
/// new one is cleared to enter, so no two nodes ever hold the service. If
/// the node fails later the service fails over as usual, and comes back as
/// soon as the node is eligible again. While the node is not eligible the
/// service stays where it is, and the `Moved` condition and a
/// `MoveNotPossible` Event say why. Remove it with
/// `kubectl annotate haservice NAME kubeha.io/move-to-` or `kubectl ha clear`.
pub const MOVE_TO: &str = "kubeha.io/move-to";

/// Annotation on an HAService: clear the service's failures, like
/// Pacemaker's `crm resource cleanup`. Any string; writing a value different
/// from the one last applied means "clear now" (`kubectl ha clear` writes
/// the current time). Each member's agent then sets its fail count for the
/// service to 0, forgets the epoch whose enter failed (so it may enter it
/// again), turns a `Failed` entry back to `Stopped`, and reports its entry;
/// the operator then sees the node eligible again and an `Errored` service
/// is placed. A clear is not a fence: a node whose leave failed has not
/// proved that it stopped, so the service still waits for that node's
/// acknowledgement, its heartbeat expiring, or an admin's `peerdown`.
pub const CLEAR: &str = "kubeha.io/clear";
