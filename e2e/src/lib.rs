//! The kubeha lab: a real etcd and kube-apiserver built from their Go modules
//! and started as processes, for the end-to-end tests and the local demo.

pub mod deps;
pub mod lab;
