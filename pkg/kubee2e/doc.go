// Package kubee2e holds ambpf's Kubernetes end-to-end tests (no library
// code). They run against a real etcd and kube-apiserver (pkg/kubetest)
// and play the kubelet themselves: a test creates a Pod through the API,
// creates its network namespace, runs the real CNI chain with cnitool
// (bridge + host-local + ambpf-cni, with K8S_POD_* CNI_ARGS), starts a
// "pause" process in the pod's netns and in a cgroup named after the pod
// UID (what the agent's /proc search looks for), and writes the pod IP
// into the Pod's status.
//
// The agent (with its Kubernetes watcher, pkg/podwatch) and the proxy run
// in the test process (agent.New/Run, proxy.New/Run): a restart is a
// cancelled context and a new instance on the same state directory, the
// pins and the ZDS socket, exactly what a restarted process sees, and
// their logs land in the test log. The CNI plugin runs as the runtime
// runs it, a process started by cnitool. The node is a netlab node
// namespace (the agent's NodeNetns): nothing touches the host's devices.
//
// The proxy runs with its Kubernetes source on (proxy.Config.Kubernetes):
// workloads, Services with their EndpointSlices, and AuthorizationPolicies
// come from the API server, into which the chart's Istio CRDs
// (charts/ambpf/crds) are installed once per run. Tests share one API
// server and one pod subnet, so each test's pods are deleted from the API
// when it ends: a stale pod would claim the next test's pod IPs.
//
// Run as root: go test ./pkg/kubee2e/
package kubee2e
