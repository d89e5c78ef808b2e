//! A fault-tolerant typed watch: the
//! API server's objects are listed and watched untyped and parsed one by one,
//! so a malformed object (e.g. written under an older schema) is logged and
//! skipped instead of failing the whole list and stalling the watch.

use futures::{Stream, StreamExt};
use kube::core::{ApiResource, DynamicObject};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

/// The annotation `kubectl apply` keeps a whole copy of the object in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Parses one untyped object; a malformed one is logged and dropped. What
/// no reader uses is dropped before it is stored: `managedFields` and
/// `kubectl apply`'s copy of the object, often larger than the rest.
fn parse<K>(mut obj: DynamicObject) -> Option<K>
where
    K: Resource<DynamicType = ()> + DeserializeOwned,
{
    obj.metadata.managed_fields = None;
    if let Some(a) = obj.metadata.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
    let name = format!(
        "{}/{}",
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.metadata.name.clone().unwrap_or_default()
    );
    match obj.try_parse::<K>() {
        Ok(k) => Some(k),
        Err(e) => {
            tracing::warn!(kind = %K::kind(&()), object = %name, error = %e, "skipping a malformed object");
            None
        }
    }
}

fn typed<K>(event: watcher::Event<DynamicObject>) -> Option<watcher::Event<K>>
where
    K: Resource<DynamicType = ()> + DeserializeOwned,
{
    use watcher::Event::*;
    match event {
        Apply(o) => parse(o).map(Apply),
        InitApply(o) => parse(o).map(InitApply),
        Delete(o) => parse(o).map(Delete),
        Init => Some(Init),
        InitDone => Some(InitDone),
    }
}

/// How a failed watch is retried: after 200 ms, doubling with jitter up to
/// 2 s, and from 200 ms again after any event. kube's default (800 ms
/// doubling up to 30 s) is kind to a struggling API server but leaves an HA
/// agent or operator blind for up to 30 s after a run of errors, ten times
/// a default lease.
pub fn retry_backoff() -> kube::runtime::watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(std::time::Duration::from_millis(200))
        .with_max_delay(std::time::Duration::from_secs(2))
        .with_factor(2.0)
        .without_max_times()
        .with_jitter()
        .into()
}

/// A fault-tolerant typed watch of `K` (in `namespace`, or every namespace)
/// reflected into a store; the returned stream must be polled for the store
/// to fill.
pub fn reflect<K>(
    client: &Client,
    namespace: Option<&str>,
    config: watcher::Config,
) -> (
    Store<K>,
    impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + use<K>,
)
where
    K: Resource<DynamicType = ()>
        + DeserializeOwned
        + Clone
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    reflect_trimmed(client, namespace, config, |_: &mut K| {})
}

/// [`reflect`], with `trim` applied to every object before it is stored:
/// what the reader never looks at need not be kept (e.g. an agent keeps
/// only its own node's entry of a status list).
pub fn reflect_trimmed<K, T>(
    client: &Client,
    namespace: Option<&str>,
    config: watcher::Config,
    trim: T,
) -> (
    Store<K>,
    impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + use<K, T>,
)
where
    T: Fn(&mut K) + Send + Sync + 'static,
    K: Resource<DynamicType = ()>
        + DeserializeOwned
        + Clone
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let ar = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    let events = watcher(api, config)
        .backoff(retry_backoff())
        .filter_map(|r| async move {
            match r {
                Ok(e) => typed::<K>(e).map(Ok),
                Err(e) => Some(Err(e)),
            }
        })
        .modify(trim);
    let (reader, writer) = reflector::store();
    (reader, reflector::reflector(writer, events))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubeha_crds::HAService;

    fn object(spec: serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kubeha.io/v1alpha1",
            "kind": "HAService",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn a_malformed_object_is_skipped_and_a_good_one_parsed() {
        let good = object(serde_json::json!({
            "clusterRef": "demo",
            "vips": [{"address": "198.18.0.100/24"}],
        }));
        assert!(parse::<HAService>(good).is_some());
        let mut applied = object(serde_json::json!({
            "clusterRef": "demo",
            "vips": [{"address": "198.18.0.100/24"}],
        }));
        applied.metadata.managed_fields = Some(vec![Default::default()]);
        applied.metadata.annotations = Some(
            [(LAST_APPLIED, "{}"), ("kubeha.io/clear", "1")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
        );
        let stored = parse::<HAService>(applied).unwrap();
        assert!(stored.metadata.managed_fields.is_none());
        assert_eq!(
            stored
                .metadata
                .annotations
                .unwrap()
                .into_keys()
                .collect::<Vec<_>>(),
            ["kubeha.io/clear"],
            "only what no reader uses is dropped"
        );
        let bad = object(serde_json::json!({"clusterRef": 7, "vips": "nope"}));
        assert!(parse::<HAService>(bad).is_none());
        let events = [
            watcher::Event::InitApply(object(serde_json::json!({"vips": 1}))),
            watcher::Event::InitDone,
        ];
        let typed: Vec<_> = events.into_iter().filter_map(typed::<HAService>).collect();
        assert!(
            matches!(typed.as_slice(), [watcher::Event::InitDone]),
            "the list ends even when an object in it is malformed"
        );
    }
}
