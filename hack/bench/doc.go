// Package bench compares the ways a pod's traffic can reach the in-pod
// proxy, side by side in one run: no capture (the client dials the server
// directly), Istio's iptables rules with a pass-through proxy, and the eBPF
// datapath with the same proxy.
//
// Everything lives in the package's tests: privileged Go benchmarks
// (connection setup rate, request latency on one connection, CPU per
// connection, enrolment cost) and a smoke test that checks the harness
// itself. cmd/benchreport runs the benchmarks several times, interleaved,
// and writes the medians and ratios to docs/BENCHMARKS.md.
//
// The in-pod fast path's A/B (capture + proxy with the fast path off,
// to-proxy, both) is pkg/fastpath's TestBenchFastPath (make
// bench-fastpath): it needs the app's sockets created in the pod's cgroup
// and the proxy in a cgroup of its own, which that package's harness
// provides and these benchmarks' in-process clients do not.
package bench
