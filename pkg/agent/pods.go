//go:build linux

package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"sort"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/zds"
)

func apiErr(status int, code, format string, args ...any) *agentapi.Error {
	return &agentapi.Error{HTTPStatus: status, Code: code, Message: fmt.Sprintf(format, args...)}
}

var errNetnsReplaced = errors.New("the path now names another network namespace")

// workloadInfo is what the proxy hears of pod p. FastPath (ambpf's ZDS
// extension) is set for every pod while this agent runs the fast path,
// not only for the pods it is attached to: a pod's choice can change
// while its proxy instance runs (its annotation), and a pod detached
// keeps its redirected connections until they close, so the instance
// must read its app sockets without splice for as long as it runs.
// ReusePort (the other extension) is always said, allowed or refused, as
// the datapath's probe of the kernel found (a probe that failed counts as
// refused): the proxy then needs no guess of its own.
func (a *Agent) workloadInfo(p agentapi.PodState) zds.WorkloadInfo {
	return zds.WorkloadInfo{
		Name: p.Name, Namespace: p.Namespace, ServiceAccount: p.ServiceAccount,
		FastPath: a.fp != nil, ReusePort: reusePortFor(a.dp.Features()),
	}
}

// reusePortFor is the ZDS ambpf_reuseport the datapath's features call for.
func reusePortFor(f datapath.Features) zds.ReusePort {
	if f.ReusePortAssign {
		return zds.ReusePortAllowed
	}
	return zds.ReusePortRefused
}

func datapathPod(p agentapi.PodState, ns *netns.NS) datapath.Pod {
	return datapath.Pod{
		UID: p.UID, Netns: ns, Interface: p.Interface, Cgroup: p.Cgroup,
		Options: datapath.Options{DNSCapture: p.DNSCapture, BypassInbound: p.BypassInbound},
	}
}

// checkEnvironment checks what Validate cannot: that the netns path is a
// network namespace holding the interface, and that the cgroup is a cgroup
// v2 directory. It returns the open netns.
func checkEnvironment(req agentapi.EnrollRequest) (*netns.NS, *agentapi.Error) {
	ns, err := netns.Open(req.Netns)
	if err != nil {
		return nil, apiErr(http.StatusBadRequest, agentapi.CodeBadNetns, "netns: %v", err)
	}
	ifname := req.Interface
	if ifname == "" {
		ifname = datapath.DefaultInterface
	}
	if err := ns.Do(func() error { _, err := net.InterfaceByName(ifname); return err }); err != nil {
		ns.Close()
		return nil, apiErr(http.StatusBadRequest, agentapi.CodeBadNetns, "netns %s has no interface %q: %v", req.Netns, ifname, err)
	}
	if req.Cgroup != "" {
		var st unix.Statfs_t
		if err := unix.Statfs(req.Cgroup, &st); err != nil {
			ns.Close()
			return nil, apiErr(http.StatusBadRequest, agentapi.CodeInvalid, "cgroup %s: %v", req.Cgroup, err)
		}
		if st.Type != unix.CGROUP2_SUPER_MAGIC {
			ns.Close()
			return nil, apiErr(http.StatusBadRequest, agentapi.CodeInvalid, "cgroup %s is not a cgroup v2 directory", req.Cgroup)
		}
	}
	return ns, nil
}

// noProxyErr is the answer to an enrolment that needs a proxy and found
// none to take the pod.
func noProxyErr(req agentapi.EnrollRequest, why string) *agentapi.Error {
	return apiErr(http.StatusServiceUnavailable, agentapi.CodeNoProxy,
		"pod %s/%s (%s): %s; nothing is left attached, retry once the node's proxy is up", req.Namespace, req.Name, req.UID, why)
}

// enroll attaches the pod's datapath, records it and hands it to the
// newest proxy. created is false when the pod was already enrolled with the
// same netns (an idempotent re-enrolment). Nothing stays attached when it
// returns an error. With requireProxy a pod the proxy does not ack is not
// left pending: the enrolment is undone and fails with CodeNoProxy (an
// already enrolled pod that is not enabled only fails the call).
func (a *Agent) enroll(ctx context.Context, req agentapi.EnrollRequest, requireProxy bool) (st agentapi.PodState, created bool, aerr *agentapi.Error) {
	if err := req.Validate(); err != nil {
		return st, false, apiErr(http.StatusBadRequest, agentapi.CodeInvalid, "%v", err)
	}
	ns, aerr := checkEnvironment(req)
	if aerr != nil {
		return st, false, aerr
	}
	defer ns.Close()
	id, err := ns.ID()
	if err != nil {
		return st, false, apiErr(http.StatusInternalServerError, agentapi.CodeInternal, "%v", err)
	}
	st = agentapi.PodState{EnrollRequest: req, NetnsID: id, State: agentapi.StatePending, EnrolledAt: time.Now().UTC()}
	log := a.podLog(st)

	defer a.podOps.lock(req.UID)()
	a.mu.Lock()
	old, known := a.pods[req.UID]
	a.mu.Unlock()
	if known && old.NetnsID != id {
		return st, false, apiErr(http.StatusConflict, agentapi.CodeConflict,
			"pod %s is already enrolled with another network namespace (%s); unenrol it first", req.UID, old.Netns)
	}

	pause("attach", req.UID)
	if _, err := a.dp.Attach(datapathPod(st, ns)); err != nil {
		return st, false, a.attachError(req, err)
	}
	a.attachFastPath(st)
	if err := a.attachProbes(st, ns); err != nil {
		if known {
			// The pod stays enrolled as it was; only this call failed.
			return st, false, apiErr(http.StatusInternalServerError, agentapi.CodeAttach, "%v", err)
		}
		return st, false, a.abandon(ctx, st, false, apiErr(http.StatusInternalServerError, agentapi.CodeAttach, "%v", err))
	}
	if known {
		// Same pod, same netns: Attach brought the options up to date;
		// keep the enrolment's progress and time.
		st.State, st.Reason, st.EnrolledAt = old.State, old.Reason, old.EnrolledAt
		if err := a.store(st); err != nil {
			return st, false, apiErr(http.StatusInternalServerError, agentapi.CodeInternal, "%v", err)
		}
		log.Info("pod already enrolled", "state", st.State)
		if requireProxy && st.State != agentapi.StateEnabled {
			return st, false, noProxyErr(req, "no proxy has taken it yet ("+st.Reason+")")
		}
		return st, false, nil
	}
	// Recorded before the ZDS Add, so a proxy connecting meanwhile gets
	// the pod in its snapshot.
	if err := a.store(st); err != nil {
		return st, false, a.abandon(ctx, st, false, apiErr(http.StatusInternalServerError, agentapi.CodeInternal, "%v", err))
	}
	log.Info("pod attached, handing it to the proxy")
	pause("handoff", req.UID)
	st, gone := a.handToProxy(ctx, st, ns)
	if gone {
		return st, false, a.abandon(ctx, st, true, apiErr(http.StatusGone, agentapi.CodeNetnsGone,
			"pod %s: its network namespace %s vanished during enrolment; nothing is left attached", req.UID, req.Netns))
	}
	if requireProxy && st.State != agentapi.StateEnabled {
		return st, false, a.abandon(ctx, st, true, noProxyErr(req, "the proxy did not take it: "+st.Reason))
	}
	return st, true, nil
}

// attachError turns a datapath error into an API error.
func (a *Agent) attachError(req agentapi.EnrollRequest, err error) *agentapi.Error {
	switch {
	case errors.Is(err, datapath.ErrBadUID):
		return apiErr(http.StatusBadRequest, agentapi.CodeInvalid, "%v", err)
	case errors.Is(err, datapath.ErrAttached):
		return apiErr(http.StatusConflict, agentapi.CodeConflict, "%v", err)
	}
	if ns, oerr := netns.Open(req.Netns); oerr != nil {
		return apiErr(http.StatusGone, agentapi.CodeNetnsGone, "pod %s: network namespace %s vanished during enrolment: %v", req.UID, req.Netns, err)
	} else {
		ns.Close()
	}
	return apiErr(http.StatusInternalServerError, agentapi.CodeAttach, "%v", err)
}

// handToProxy sends the pod to the newest proxy and returns its new state:
// enabled on an ack, pending (with a retry scheduled) otherwise. gone is
// true when the proxy did not take the pod and its netns has vanished:
// the caller gives up on the pod. The caller holds the pod's lock.
func (a *Agent) handToProxy(ctx context.Context, st agentapi.PodState, ns *netns.NS) (_ agentapi.PodState, gone bool) {
	log := a.podLog(st)
	a.prepareHandoff(st.UID, ns)
	actx, cancel := context.WithTimeout(ctx, 2*a.cfg.ZDSTimeout)
	err := a.zdsServer().Add(actx, st.UID, a.workloadInfo(st), ns.File())
	cancel()
	if err == nil {
		st.State, st.Reason = agentapi.StateEnabled, ""
		a.mu.Lock()
		delete(a.retries, st.UID)
		a.mu.Unlock()
		if serr := a.store(st); serr != nil {
			log.Error("pod enabled but the state file was not written", "err", serr)
		}
		log.Info("pod enabled: the proxy acked it")
		return st, false
	}
	if !errors.Is(err, zds.ErrNoConnection) {
		if cns, oerr := a.openPodNetns(st); oerr != nil {
			log.Warn("the proxy did not take the pod and its netns is gone", "err", err, "netns_err", oerr)
			return st, true
		} else {
			cns.Close()
		}
	}
	st.State, st.Reason = agentapi.StatePending, err.Error()
	a.mu.Lock()
	b := a.retries[st.UID]
	if b == nil {
		b = &backoff{delay: a.cfg.RetryMin}
		a.retries[st.UID] = b
	} else {
		b.delay = min(2*b.delay, a.cfg.RetryMax)
	}
	b.next = time.Now().Add(b.delay)
	a.mu.Unlock()
	if serr := a.store(st); serr != nil {
		log.Error("state file not written", "err", serr)
	}
	log.Warn("pod pending: the proxy has not taken it yet", "reason", st.Reason, "retry_in", b.delay)
	return st, false
}

// abandon undoes an enrolment: Del to the proxies when one may have got
// the pod, Detach, forget. It returns aerr, with the cleanup failure added.
// The caller holds the pod's lock.
func (a *Agent) abandon(ctx context.Context, st agentapi.PodState, sentToProxy bool, aerr *agentapi.Error) *agentapi.Error {
	var errs []error
	if sentToProxy {
		if err := a.zdsServer().Del(ctx, st.UID); err != nil {
			a.podLog(st).Warn("del after a failed enrolment", "err", err)
		}
	}
	if err := a.dp.Detach(st.UID); err != nil && !errors.Is(err, datapath.ErrNotAttached) {
		errs = append(errs, err)
	}
	errs = append(errs, a.detachFastPath(st.UID), a.detachProbes(st.UID), a.forget(st.UID))
	if err := errors.Join(errs...); err != nil {
		aerr.Message += fmt.Sprintf(" (cleanup: %v)", err)
	}
	a.podLog(st).Warn("enrolment abandoned", "err", aerr.Message)
	return aerr
}

// unenroll stops the pod's proxies (Del to all) and detaches its datapath
// and probe SNAT, unless keepDatapath: then the pins stay (the pod is
// being deleted and its traffic stays captured until its namespace goes;
// CNI DEL or the next start's verify removes them).
func (a *Agent) unenroll(ctx context.Context, uid string, keepDatapath bool) *agentapi.Error {
	if err := agentapi.ValidateUID(uid); err != nil {
		return apiErr(http.StatusBadRequest, agentapi.CodeInvalid, "%v", err)
	}
	defer a.podOps.lock(uid)()
	return a.unenrollLocked(ctx, uid, keepDatapath)
}

// unenrollLocked is unenroll for a caller holding the pod's lock.
func (a *Agent) unenrollLocked(ctx context.Context, uid string, keepDatapath bool) *agentapi.Error {
	a.mu.Lock()
	st, known := a.pods[uid]
	a.mu.Unlock()
	if !known {
		st = agentapi.PodState{EnrollRequest: agentapi.EnrollRequest{UID: uid}}
	}
	_, gerr := a.dp.Get(uid)
	pinned := gerr == nil
	if !known && !pinned {
		return apiErr(http.StatusNotFound, agentapi.CodeNotFound, "pod %s is not enrolled", uid)
	}
	log := a.podLog(st)
	dctx, cancel := context.WithTimeout(ctx, 2*a.cfg.ZDSTimeout)
	if err := a.zdsServer().Del(dctx, uid); err != nil {
		// The proxy tears the pod down anyway when it cannot reach the
		// netns; the datapath must go regardless.
		log.Warn("a proxy did not ack the del", "err", err)
	}
	cancel()
	if keepDatapath {
		// New sockets of the pod take TCP from now on; the capture pins stay.
		if err := a.detachFastPath(uid); err != nil {
			log.Warn("detach fast path", "err", err)
		}
		if err := a.forget(uid); err != nil {
			return apiErr(http.StatusInternalServerError, agentapi.CodeInternal, "%v", err)
		}
		log.Info("pod removed from the proxies; its datapath stays until its netns goes")
		return nil
	}
	if err := a.detachFastPath(uid); err != nil {
		return apiErr(http.StatusInternalServerError, agentapi.CodeInternal, "pod %s: %v", uid, err)
	}
	if err := a.dp.Detach(uid); err != nil && !errors.Is(err, datapath.ErrNotAttached) {
		return apiErr(http.StatusInternalServerError, agentapi.CodeInternal, "detach pod %s: %v", uid, err)
	}
	if err := a.detachProbes(uid); err != nil {
		return apiErr(http.StatusInternalServerError, agentapi.CodeInternal, "pod %s: %v", uid, err)
	}
	if err := a.forget(uid); err != nil {
		return apiErr(http.StatusInternalServerError, agentapi.CodeInternal, "%v", err)
	}
	log.Info("pod unenrolled")
	return nil
}

func (a *Agent) zdsServer() *zds.Server {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.zds
}

// store records st and writes the state file.
func (a *Agent) store(st agentapi.PodState) error {
	a.mu.Lock()
	a.pods[st.UID] = st
	err := a.state.save(a.pods)
	a.mu.Unlock()
	a.notify(st, false)
	return err
}

// forget drops uid and writes the state file.
func (a *Agent) forget(uid string) error {
	a.mu.Lock()
	st, known := a.pods[uid]
	delete(a.pods, uid)
	delete(a.retries, uid)
	err := a.state.save(a.pods)
	a.mu.Unlock()
	if known {
		a.notify(st, true)
	}
	return err
}

// snapshotPods copies the pods, sorted by UID.
func (a *Agent) snapshotPods() []agentapi.PodState {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]agentapi.PodState, 0, len(a.pods))
	for _, p := range a.pods {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].UID < out[j].UID })
	return out
}

// snapshotSource gives a connecting proxy every enrolled pod: an Add with a
// freshly opened netns for each pod whose netns still opens (and is still
// the same namespace), a Keep otherwise.
type snapshotSource struct{ a *Agent }

func (s snapshotSource) Snapshot(context.Context) ([]zds.Pod, error) {
	var out []zds.Pod
	for _, p := range s.a.snapshotPods() {
		out = append(out, zds.Pod{UID: p.UID, Info: s.a.workloadInfo(p), OpenNetns: func() (*os.File, error) {
			ns, err := s.a.openPodNetns(p)
			if err != nil {
				return nil, err
			}
			s.a.prepareHandoff(p.UID, ns)
			return ns.File(), nil
		}})
	}
	// A proxy that took the snapshot may now have the pending pods: try
	// them again at once rather than at their backoff.
	s.a.retryAllSoon()
	return out, nil
}

func (a *Agent) retryAllSoon() {
	a.mu.Lock()
	for _, b := range a.retries {
		b.next = time.Time{}
		b.delay = a.cfg.RetryMin
	}
	a.mu.Unlock()
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// retryLoop hands pending pods to the proxy again, each at its backoff,
// while a proxy is connected (with none, the next proxy's snapshot carries
// them, and Snapshot restarts the backoff).
func (a *Agent) retryLoop(ctx context.Context) {
	t := time.NewTicker(retryTick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-a.kick:
		}
		if a.zdsServer().Status().Synced == 0 {
			continue
		}
		a.retryDue(ctx)
	}
}

func (a *Agent) retryDue(ctx context.Context) {
	now := time.Now()
	a.mu.Lock()
	var due []string
	for uid, b := range a.retries {
		if !b.next.After(now) {
			due = append(due, uid)
		}
	}
	a.mu.Unlock()
	sort.Strings(due)
	for _, uid := range due {
		if ctx.Err() != nil {
			return
		}
		a.retryOne(ctx, uid)
	}
}

func (a *Agent) retryOne(ctx context.Context, uid string) {
	defer a.podOps.lock(uid)()
	a.mu.Lock()
	st, ok := a.pods[uid]
	a.mu.Unlock()
	if !ok || st.State != agentapi.StatePending {
		a.mu.Lock()
		delete(a.retries, uid)
		a.mu.Unlock()
		return
	}
	ns, err := a.openPodNetns(st)
	if err != nil {
		a.abandon(ctx, st, true, apiErr(http.StatusGone, agentapi.CodeNetnsGone, "pending pod's netns is gone: %v", err))
		return
	}
	defer ns.Close()
	if _, gone := a.handToProxy(ctx, st, ns); gone {
		a.abandon(ctx, st, true, apiErr(http.StatusGone, agentapi.CodeNetnsGone, "pending pod's netns is gone"))
	}
}
