package dpstate

// FastPathCounters are a pod's fast path counters (bpf/fastpath.c struct
// fp_counters).
type FastPathCounters struct {
	AppSockets   uint64 `json:"app_sockets"`    // app sockets recorded
	Paired       uint64 `json:"paired"`         // proxy sockets recorded as an app socket's peer
	MsgsToProxy  uint64 `json:"msgs_to_proxy"`  // sendmsg calls redirected app -> proxy
	BytesToProxy uint64 `json:"bytes_to_proxy"` //
	MsgsToApp    uint64 `json:"msgs_to_app"`    // proxy -> app
	BytesToApp   uint64 `json:"bytes_to_app"`   //
	Fallback     uint64 `json:"fallback"`       // sockets that went (on) through TCP: no peer, or it was gone
	Full         uint64 `json:"full"`           // sockets not recorded: a map was full
}

// FastPath is a pod's fast path (pkg/fastpath) as the agent reports it.
type FastPath struct {
	// Mode is off, to-proxy or both.
	Mode     string           `json:"mode"`
	Attached bool             `json:"attached"`
	Index    uint32           `json:"index"`
	Counters FastPathCounters `json:"counters"`
	// Error says why the pod runs without the fast path although the
	// agent has it on (kernel without it, no pod cgroup, attach failure):
	// its traffic then takes TCP, as without the fast path.
	Error string `json:"error,omitempty"`
	// Disabled says why the pod has no fast path by choice: its
	// ambpf.io/fastpath annotation, or the node's default (the agent's
	// --fastpath-default disabled) that no annotation overrode.
	Disabled string `json:"disabled,omitempty"`
}
