//go:build tools

// Package tools pins the etcd server the lab builds from this module.
package tools

import _ "go.etcd.io/etcd/server/v3"
