//go:build tools

// Package tools pins the helm command the lab builds from this module.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
