// Package kubetest runs a real Kubernetes control plane (etcd and
// kube-apiserver with RBAC authorization) on loopback for tests, and
// runs kubectl and helm against it.
//
// The binaries are built from the Go module proxy by hack/kube/build.sh
// into .cache/kube/bin/<version>/ the first time they are needed (about
// 5 minutes on 2 cores) and reused afterwards. Start gives a test its own
// control plane; RunShared and Shared share one among a package's tests.
package kubetest
