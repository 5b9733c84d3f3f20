//go:build linux

package agent

import (
	"encoding/json"
	"net/http"

	"github.com/ambpf/ambpf/pkg/agentapi"
)

// apiHandler serves the enrolment API (see pkg/agentapi).
func (a *Agent) apiHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/pods", a.handleEnroll)
	mux.HandleFunc("GET /v1/pods", a.handleList)
	mux.HandleFunc("GET /v1/pods/{uid}", a.handleGet)
	mux.HandleFunc("DELETE /v1/pods/{uid}", a.handleUnenroll)
	mux.HandleFunc("GET /v1/status", a.handleStatus)
	// Everything else, including a known path with the wrong method, gets
	// a JSON error rather than the mux's plain text.
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, apiErr(http.StatusNotFound, agentapi.CodeNotFound, "no endpoint %s %s", r.Method, r.URL.Path))
	})
	return mux
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v) // a failed write means the client left
}

func writeError(w http.ResponseWriter, e *agentapi.Error) {
	writeJSON(w, e.HTTPStatus, e)
}

// notReady answers 503 while the agent starts or stops.
func (a *Agent) notReady(w http.ResponseWriter) bool {
	if a.Ready() {
		return false
	}
	writeError(w, apiErr(http.StatusServiceUnavailable, agentapi.CodeUnavailable, "agent is not ready"))
	return true
}

func (a *Agent) handleEnroll(w http.ResponseWriter, r *http.Request) {
	if a.notReady(w) {
		return
	}
	var req agentapi.EnrollRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxRequestBytes))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, apiErr(http.StatusBadRequest, agentapi.CodeInvalid, "decode enrol request: %v", err))
		return
	}
	if dec.More() {
		writeError(w, apiErr(http.StatusBadRequest, agentapi.CodeInvalid, "decode enrol request: data after the JSON object"))
		return
	}
	if skip, aerr := a.admit(r.Context(), &req); aerr != nil || skip != nil {
		if aerr != nil {
			writeError(w, aerr)
		} else {
			writeJSON(w, http.StatusOK, skip)
		}
		return
	}
	// In Kubernetes mode the caller is the runtime's CNI ADD: a pod must
	// not start while no proxy serves it (kubelet's probes would pass
	// through the probe SNAT and make it Ready with every connection
	// held). Failing the ADD makes the runtime tear the sandbox down and
	// retry it, as istio-cni does while no ztunnel is connected.
	requireProxy := a.cfg.Controller != nil
	if requireProxy {
		if s := a.zdsServer(); s == nil || s.Status().Connections == 0 {
			writeError(w, noProxyErr(req, "no proxy is connected to the agent"))
			return
		}
	}
	st, created, aerr := a.enroll(r.Context(), req, requireProxy)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	status := http.StatusOK
	if created {
		status = http.StatusCreated
	}
	writeJSON(w, status, st)
}

func (a *Agent) handleUnenroll(w http.ResponseWriter, r *http.Request) {
	if a.notReady(w) {
		return
	}
	if aerr := a.unenroll(r.Context(), r.PathValue("uid"), false); aerr != nil {
		writeError(w, aerr)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (a *Agent) handleList(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, a.snapshotPods())
}

func (a *Agent) handleGet(w http.ResponseWriter, r *http.Request) {
	uid := r.PathValue("uid")
	if err := agentapi.ValidateUID(uid); err != nil {
		writeError(w, apiErr(http.StatusBadRequest, agentapi.CodeInvalid, "%v", err))
		return
	}
	a.mu.Lock()
	st, ok := a.pods[uid]
	a.mu.Unlock()
	if !ok {
		writeError(w, apiErr(http.StatusNotFound, agentapi.CodeNotFound, "pod %s is not enrolled", uid))
		return
	}
	out := agentapi.PodStatus{PodState: st}
	if dp, err := a.dp.Get(uid); err != nil {
		out.DatapathError = err.Error()
	} else {
		out.Datapath = &dp
	}
	out.FastPath = a.fastPathStatus(uid)
	writeJSON(w, http.StatusOK, out)
}

func (a *Agent) handleStatus(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, a.Status())
}

// Status reports the agent's readiness, datapath features, proxy
// connections and pod counts.
func (a *Agent) Status() agentapi.Status {
	f := a.dp.Features()
	feat := agentapi.Features{Kernel: f.Kernel, Mode: f.Mode.String(), ReusePortAssign: f.ReusePortAssign}
	if f.ReusePortErr != nil {
		feat.ReusePortProbeError = f.ReusePortErr.Error()
	}
	out := agentapi.Status{
		Ready:    a.Ready(),
		Features: feat,
		BPFRoot:  a.dp.Root(),
		ZDSPath:  a.cfg.ZDSPath,
	}
	if m, err := a.dp.Memory(); err == nil {
		out.Memory = &agentapi.Memory{NodeBytes: m.Node, PodsBytes: m.Pods, Enrolled: m.Enrolled, PerPodBytes: m.PerPod()}
	}
	if s := a.zdsServer(); s != nil {
		zs := s.Status()
		out.Proxy = agentapi.ProxyStatus{Connections: zs.Connections, Synced: zs.Synced}
	}
	if cgs, err := a.dp.ProxyCgroups(); err == nil {
		for _, c := range cgs {
			out.Proxy.Cgroups = append(out.Proxy.Cgroups, agentapi.ProxyCgroup{ID: c.ID, PID: c.PID})
		}
	}
	for _, p := range a.snapshotPods() {
		out.Pods.Total++
		switch p.State {
		case agentapi.StateEnabled:
			out.Pods.Enabled++
		case agentapi.StatePending:
			out.Pods.Pending++
		}
	}
	return out
}
