//! The kubeha lab: a real etcd and kube-apiserver built from their Go modules
//! and started as processes, and nodes on an isolated network segment (one
//! network namespace per node), for the end-to-end tests and the local demo.

pub mod arp_probe;
pub mod bench;
pub mod chaos;
pub mod demo;
pub mod deps;
pub mod ha;
pub mod hostile;
pub mod images;
pub mod keepalived;
pub mod lab;
pub mod nodes;
pub mod pods;
pub mod split_brain;
