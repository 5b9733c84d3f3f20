// Package nodee2e tests the installed system on a real node (hack/node):
// kubelet, containerd with runc, the bridge CNI, the chart installed with
// helm from images built by `make image`, pods created by the runtime.
// The tests drive it as a user would, through helm and kubectl, and look
// at the result on the wire (tcpdump on the node's bridge) and in the
// kernel (pins, in-pod rules, cgroup programs).
//
// They run under `make e2e-node` (AMBPF_E2E_NODE=1), which builds what
// they need first; plain `go test ./...` skips them with that message.
package nodee2e
