//go:build linux

// Command ambpf-cni is ambpf's chained CNI plugin: it enrols each new pod
// with the ambpf agent. See pkg/cniplugin.
package main

import "github.com/ambpf/ambpf/pkg/cniplugin"

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() { cniplugin.Main(version) }
