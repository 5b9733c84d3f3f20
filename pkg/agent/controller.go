//go:build linux

package agent

import (
	"context"
	"fmt"
	"net/http"

	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/netns"
)

// Controller is a source of enrolment decisions outside the API, such as
// the Kubernetes pod watcher (pkg/podwatch). With a Controller the agent
// asks it about every enrolment the API receives, tells it about every
// state change, and holds its readiness (and the ZDS server) until the
// controller has rebuilt its pods.
type Controller interface {
	// Admit decides an enrolment request that arrived through the API
	// (the CNI plugin), before anything is attached. It may complete req
	// (service account, options, cgroup). enrol false answers the caller
	// success with nothing enrolled (the pod is not in the mesh; reason
	// says why); an error fails the request, so the runtime retries.
	Admit(ctx context.Context, req *agentapi.EnrollRequest) (enrol bool, reason string, err error)
	// Changed is called after a pod's record changed (enrolled, enabled,
	// pending, re-pathed) or was removed. It runs on the goroutine that
	// made the change and must not block or call back into the agent:
	// queue the work.
	Changed(st agentapi.PodState, removed bool)
	// Locate returns the current path of the pod's network namespace
	// when its recorded path no longer opens it (the process whose
	// /proc/<pid>/ns/net was recorded exited, the pod lives on). The
	// agent checks that the path names the same namespace.
	Locate(st agentapi.PodState) (string, error)
	// Run runs the controller until ctx ends, enrolling and removing
	// pods through ops. It calls synced once it has brought the agent in
	// line with its source; until then the agent serves no proxy and is
	// not ready. A non-nil error (other than at ctx's end) stops the
	// agent.
	Run(ctx context.Context, ops Ops, synced func()) error
}

// Ops are the pod operations the agent offers a Controller. *Agent
// implements them.
type Ops interface {
	// Enroll attaches the pod's datapath and hands it to the proxy, as
	// the API does but without asking Admit. It is idempotent for a pod
	// enrolled in the same network namespace.
	Enroll(ctx context.Context, req agentapi.EnrollRequest) (agentapi.PodState, error)
	// Unenroll sends a Del to every proxy, detaches the datapath unless
	// keepDatapath (the pod is being deleted: its namespace goes away,
	// and until then its traffic stays captured, fail closed), and
	// forgets the pod. An unknown pod is not an error.
	Unenroll(ctx context.Context, uid string, keepDatapath bool) error
	// Pod returns the agent's record of uid.
	Pod(uid string) (agentapi.PodState, bool)
	// Pods returns every enrolled pod, sorted by UID.
	Pods() []agentapi.PodState
}

var _ Ops = (*Agent)(nil)

// Enroll implements Ops.
func (a *Agent) Enroll(ctx context.Context, req agentapi.EnrollRequest) (agentapi.PodState, error) {
	st, _, aerr := a.enroll(ctx, req, false)
	if aerr != nil {
		return st, aerr
	}
	return st, nil
}

// Unenroll implements Ops.
func (a *Agent) Unenroll(ctx context.Context, uid string, keepDatapath bool) error {
	if aerr := a.unenroll(ctx, uid, keepDatapath); aerr != nil {
		if aerr.Code == agentapi.CodeNotFound {
			return nil
		}
		return aerr
	}
	return nil
}

// Pod implements Ops.
func (a *Agent) Pod(uid string) (agentapi.PodState, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	st, ok := a.pods[uid]
	return st, ok
}

// Pods implements Ops.
func (a *Agent) Pods() []agentapi.PodState { return a.snapshotPods() }

// admit asks the controller about an API enrolment. It returns a non-nil
// state when the pod is not to be enrolled (the answer to send).
func (a *Agent) admit(ctx context.Context, req *agentapi.EnrollRequest) (*agentapi.PodState, *agentapi.Error) {
	c := a.cfg.Controller
	if c == nil {
		return nil, nil
	}
	ok, reason, err := c.Admit(ctx, req)
	if err != nil {
		return nil, apiErr(http.StatusServiceUnavailable, agentapi.CodeUnavailable, "pod %s: %v", req.UID, err)
	}
	if ok {
		return nil, nil
	}
	a.log.Info("pod not enrolled", "uid", req.UID, "pod", req.Namespace+"/"+req.Name, "reason", reason)
	return &agentapi.PodState{EnrollRequest: *req, Reason: "not enrolled: " + reason}, nil
}

// notify tells the controller about a change; the caller holds no lock.
func (a *Agent) notify(st agentapi.PodState, removed bool) {
	if c := a.cfg.Controller; c != nil {
		c.Changed(st, removed)
	}
}

// openPodNetns opens the pod's netns by its recorded path and checks that
// it is still the namespace the pod was enrolled with: a path can be
// reused. When the path fails and a controller can locate the namespace
// elsewhere, the pod's record moves to the new path.
func (a *Agent) openPodNetns(p agentapi.PodState) (*netns.NS, error) {
	ns, err := openNetnsAs(p.Netns, p.NetnsID)
	if err == nil || a.cfg.Controller == nil {
		return ns, err
	}
	path, lerr := a.cfg.Controller.Locate(p)
	if lerr != nil || path == p.Netns {
		return nil, err
	}
	ns, lerr = openNetnsAs(path, p.NetnsID)
	if lerr != nil {
		return nil, fmt.Errorf("%w (located at %s: %v)", err, path, lerr)
	}
	a.mu.Lock()
	cur, ok := a.pods[p.UID]
	if ok && cur.NetnsID == p.NetnsID {
		cur.Netns = path
		a.pods[p.UID] = cur
	}
	a.mu.Unlock()
	a.podLog(p).Info("pod's netns found at a new path", "old", p.Netns, "new", path)
	return ns, nil
}

// openNetnsAs opens path and checks that it is the namespace id.
func openNetnsAs(path string, id netns.ID) (*netns.NS, error) {
	ns, err := netns.Open(path)
	if err != nil {
		return nil, err
	}
	got, err := ns.ID()
	if err == nil && got != id {
		err = fmt.Errorf("netns %s: %w", path, errNetnsReplaced)
	}
	if err != nil {
		ns.Close()
		return nil, err
	}
	return ns, nil
}
