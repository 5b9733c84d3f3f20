// Package discovery tells the proxy what the mesh looks like: workloads,
// services, authorization policies and mTLS modes, with lookups by IP and
// VIP and a change notification (Source).
//
// Store is the in-memory Source, built from prioritised layers so that
// several origins compose: a local file (File) and the pods enrolled on
// this node through ZDS, which the proxy adds and removes at run time
// (Layer.PutWorkload, Layer.DeleteWorkload). A control-plane client can
// later be one more layer.
//
// # File format
//
// A discovery file is YAML, possibly several documents separated by
// "---". A document with no kind holds any of these fields (lists from
// several such documents are concatenated):
//
//	trustDomain: cluster.local      # SPIFFE trust domain (default cluster.local)
//	rootNamespace: istio-system     # namespace of mesh-wide policies (default istio-system)
//	mtls:
//	  mode: STRICT                  # mesh-wide: STRICT or PERMISSIVE (default PERMISSIVE)
//	  namespaces:                   # per-namespace overrides
//	    legacy: PERMISSIVE
//	workloads:
//	- name: httpbin-7f9c            # required, with namespace; unique per namespace
//	  namespace: demo
//	  uid: 0b1e...                  # pod UID, optional
//	  serviceAccount: httpbin       # identity spiffe://<td>/ns/demo/sa/httpbin ("default" if empty)
//	  ips: [10.244.1.5, "fd00::5"]  # an IP belongs to one workload only
//	  labels: {app: httpbin, version: v1}
//	  node: node-a
//	  network: ""                   # multi-network name, optional
//	  protocol: HBONE               # HBONE (has a mesh proxy) or TCP (default)
//	  hboneTransport: h3            # h3: HBONE over HTTP/3 (UDP), falling back to h2; h2; default: the proxy's setting
//	services:
//	- name: httpbin                 # required, with namespace
//	  namespace: demo
//	  vips: [10.96.0.10]
//	  ports: {8000: 8080, 9000: 0}  # service port -> target port (0: same port)
//	  endpoints:                    # explicit endpoints; ready defaults to true
//	  - {ip: 10.244.1.5}
//	  - {ip: 10.244.2.7, ready: false}
//	  selector: {app: httpbin}      # optional: also every workload of the namespace with these labels
//	policies: []                    # AuthorizationPolicy objects, as below
//
// A document with kind AuthorizationPolicy is one Istio
// security.istio.io/v1 AuthorizationPolicy, exactly as applied to
// Kubernetes (metadata.namespace is required; see package authz for the
// L4 semantics). A document with kind PeerAuthentication sets the mTLS
// mode of its namespace, or mesh-wide when its namespace is the root
// namespace; selectors and port-level modes are refused, and DISABLE is
// refused as in Istio ambient mode. Other kinds are errors.
//
// Unknown fields are errors, so a typo does not silently change meaning.
// Errors carry the line they refer to: exact for YAML syntax errors, the
// first line holding the offending field or value otherwise.
//
// testdata/discovery/example.yaml is a complete example.
//
// # Reloading
//
// File polls the file (inode, size and mtime) and reloads it on change.
// A file that fails to parse or validate is logged with its error and
// leaves the previous content in place; File.Err reports it, so a
// readiness check can surface it.
package discovery
