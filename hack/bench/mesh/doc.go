// Package mesh benchmarks the whole mesh data path through the installed
// binaries: pods on a bridge, the real ambpf-agent and ambpf-proxy in the
// node namespace, and rows none (no pod enrolled), pass (the client's pod
// enrolled, the server outside the mesh), mesh-h2 and mesh-h3 (both
// enrolled, HBONE over HTTP/2 or HTTP/3), and the reference rows
// relay-tcp and relay-tls (hack/bench/relay: the least a user-space proxy
// must do, its floor on the machine), measured one after the other for
// each metric. Everything is in BenchmarkMesh; `make bench-mesh`
// (hack/bench/cmd/benchreport -suite mesh) runs it several times with
// the rows' order rotated and writes the medians to docs/BENCHMARKS.md.
package mesh
