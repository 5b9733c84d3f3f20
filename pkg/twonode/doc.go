// Package twonode holds the two-node end-to-end tests: two node network
// namespaces routed to each other (pkg/nodelab), each running the real
// ambpf-agent and ambpf-proxy binaries with its own CA intermediate, pods
// made by real CNI, remote pods learnt from a shared discovery file. They
// check cross-node HBONE on the wire, policy on the destination node,
// STRICT mTLS, a proxy restart on one node, a pod moving between nodes and
// HBONE connection pooling between nodes. The package has no code of its
// own.
package twonode
