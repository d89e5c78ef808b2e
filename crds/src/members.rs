//! Membership rules shared by the operator and the agent: whether a Node's
//! labels match `spec.members.selector`, and whether (and in which mode) a
//! node is a member of a cluster. Pure, so both sides decide alike.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::cluster::Members;
use crate::mode::Mode;

/// Whether `labels` match a Kubernetes label selector (matchLabels and
/// matchExpressions In, NotIn, Exists, DoesNotExist; an unknown operator
/// matches nothing). An empty selector matches everything.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    by_labels && by_expressions
}

/// The mode of `node` in a cluster with these `members`, or `None` when it
/// is not a member. A listed node has the mode of its first entry; a node
/// that is not listed but whose labels (`node_labels`, `None` when its Node
/// object is unknown) match the selector is a member in mode `default`.
pub fn member_mode(
    members: &Members,
    node: &str,
    node_labels: Option<&BTreeMap<String, String>>,
) -> Option<Mode> {
    if let Some(m) = members.nodes.iter().find(|m| m.name == node) {
        return Some(m.mode);
    }
    match (&members.selector, node_labels) {
        (Some(selector), Some(labels)) if selector_matches(selector, labels) => Some(Mode::Default),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::MemberNode;
    use crate::testing::labels;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    #[test]
    fn selectors() {
        let l = labels(&[("ha", "yes"), ("zone", "a")]);
        let sel = |ml: &[(&str, &str)], ex: Vec<LabelSelectorRequirement>| LabelSelector {
            match_labels: Some(labels(ml)),
            match_expressions: Some(ex),
        };
        let req = |key: &str, op: &str, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        };
        assert!(selector_matches(&LabelSelector::default(), &l));
        assert!(selector_matches(&sel(&[("ha", "yes")], vec![]), &l));
        assert!(!selector_matches(&sel(&[("ha", "no")], vec![]), &l));
        assert!(selector_matches(
            &sel(&[], vec![req("zone", "In", &["a", "b"])]),
            &l
        ));
        assert!(!selector_matches(
            &sel(&[], vec![req("zone", "NotIn", &["a"])]),
            &l
        ));
        assert!(selector_matches(
            &sel(&[], vec![req("rack", "NotIn", &["a"])]),
            &l
        ));
        assert!(selector_matches(
            &sel(&[], vec![req("ha", "Exists", &[])]),
            &l
        ));
        assert!(selector_matches(
            &sel(&[], vec![req("rack", "DoesNotExist", &[])]),
            &l
        ));
        assert!(!selector_matches(
            &sel(&[], vec![req("ha", "Bogus", &[])]),
            &l
        ));
    }

    #[test]
    fn listed_mode_wins_then_selector_gives_default() {
        let members = Members {
            nodes: vec![
                MemberNode {
                    name: "n-a".into(),
                    mode: Mode::Locked,
                },
                MemberNode {
                    name: "n-a".into(),
                    mode: Mode::Single,
                },
            ],
            selector: Some(LabelSelector {
                match_labels: Some(labels(&[("ha", "yes")])),
                match_expressions: None,
            }),
        };
        let yes = labels(&[("ha", "yes")]);
        let no = labels(&[("ha", "no")]);
        // Listed: the first entry's mode, whatever the labels say.
        assert_eq!(member_mode(&members, "n-a", None), Some(Mode::Locked));
        assert_eq!(member_mode(&members, "n-a", Some(&no)), Some(Mode::Locked));
        // Selected only: default.
        assert_eq!(
            member_mode(&members, "n-b", Some(&yes)),
            Some(Mode::Default)
        );
        assert_eq!(member_mode(&members, "n-b", Some(&no)), None);
        // Node object unknown: not (yet) a selected member.
        assert_eq!(member_mode(&members, "n-b", None), None);
        // No selector: only listed nodes.
        let listed_only = Members {
            selector: None,
            ..members
        };
        assert_eq!(member_mode(&listed_only, "n-b", Some(&yes)), None);
    }
}
