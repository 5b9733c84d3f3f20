//go:build linux

// Package cniplugin is ambpf-cni, a chained CNI plugin (spec 1.0/1.1) that
// enrols a pod with the ambpf node agent once the primary plugin has set up
// its network: ADD asks the agent to attach the datapath and returns the
// previous result unchanged, DEL unenrols, CHECK verifies the datapath is
// attached, STATUS reports whether the agent is reachable and ready.
//
// The plugin holds no state; the agent does. A failed ADD leaves nothing
// attached: the agent's enrolment is atomic, and when the answer is lost
// the plugin asks the agent to undo it.
package cniplugin

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/netns"
)

// Timeouts of the agent calls. ADD covers an attach (tens of ms) and a
// proxy's ack (the agent waits at most 10 s for it before going pending).
const (
	addTimeout   = 30 * time.Second
	otherTimeout = 10 * time.Second
	undoTimeout  = 5 * time.Second
)

// Main runs the plugin; it does not return on error (skel prints the
// error as CNI JSON and exits 1).
func Main(buildVersion string) {
	skel.PluginMainFuncs(skel.CNIFuncs{Add: Add, Del: Del, Check: Check, Status: Status},
		version.PluginSupports("0.4.0", "1.0.0", "1.1.0"), "CNI plugin "+PluginType+" "+buildVersion)
}

// agentError turns an agent call failure into a CNI error: the agent's own
// message when it answered ("try again later" when it is not ready or no
// proxy took the pod), "try again later" when it could not be reached.
func agentError(op string, socket string, err error) error {
	var ae *agentapi.Error
	if errors.As(err, &ae) {
		code := uint(types.ErrInternal)
		if ae.Code == agentapi.CodeUnavailable || ae.Code == agentapi.CodeNoProxy {
			code = types.ErrTryAgainLater
		}
		return types.NewError(code, fmt.Sprintf("%s: the ambpf agent refused: %s", op, ae.Message), ae.Code)
	}
	return types.NewError(types.ErrTryAgainLater, fmt.Sprintf("%s: the ambpf agent is not reachable at %s", op, socket), err.Error())
}

// parseConfig parses the network configuration on stdin, failing with
// the CNI decoding error.
func parseConfig(args *skel.CmdArgs) (*NetConf, error) {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, err.Error(), "")
	}
	return conf, nil
}

// load parses the network configuration and the pod's identity from the
// CNI_ARGS, each failure as the CNI error the runtime expects for it.
func load(args *skel.CmdArgs) (*NetConf, agentapi.EnrollRequest, error) {
	conf, err := parseConfig(args)
	if err != nil {
		return nil, agentapi.EnrollRequest{}, err
	}
	req, err := identity(conf, args.Args)
	if err != nil {
		return nil, agentapi.EnrollRequest{}, types.NewError(types.ErrInvalidEnvironmentVariables, err.Error(), "")
	}
	return conf, req, nil
}

// Add enrols the pod and passes the previous result through.
func Add(args *skel.CmdArgs) error {
	conf, req, err := load(args)
	if err != nil {
		return err
	}
	if req.IPs, err = prevIPs(conf); err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig, err.Error(), "")
	}
	req.Netns, req.Interface = args.Netns, args.IfName
	if err := req.Validate(); err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "pod identity: "+err.Error(), "")
	}
	c := agentapi.NewClient(conf.AgentSocket)
	ctx, cancel := context.WithTimeout(context.Background(), addTimeout)
	defer cancel()
	st, err := c.Enroll(ctx, req)
	if err != nil {
		var ae *agentapi.Error
		if !errors.As(err, &ae) {
			// The answer was lost (timeout, agent died): the agent may
			// have attached. Undo so a failed ADD leaves nothing.
			uctx, ucancel := context.WithTimeout(context.Background(), undoTimeout)
			c.Unenroll(uctx, req.UID)
			ucancel()
		}
		return agentError("enrol pod "+req.UID, conf.AgentSocket, err)
	}
	if st.State != "" {
		// Enrolled. The next proxy upgrade's listener hand-over needs
		// tcp_migrate_req in the pod's netns. The agent sets it too,
		// but a non-privileged agent cannot (/proc/sys is read-only in
		// its container); the plugin runs on the host. Best effort: it
		// only matters in an upgrade, and old kernels lack it.
		if ns, err := netns.Open(args.Netns); err == nil {
			ns.SetSysctl(meshconst.MigrateReqSysctl, "1")
			ns.Close()
		}
	}
	return types.PrintResult(conf.PrevResult, conf.CNIVersion)
}

// Del unenrols the pod. A pod the agent does not know is success. With the
// agent unreachable it fails (so the runtime retries) unless the pod's
// netns is already gone: the agent drops such pods when it starts.
func Del(args *skel.CmdArgs) error {
	conf, req, err := load(args)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), otherTimeout)
	defer cancel()
	c := agentapi.NewClient(conf.AgentSocket)
	if st, err := c.Pod(ctx, req.UID); err == nil && otherSandbox(st, args.Netns) {
		return nil
	}
	err = c.Unenroll(ctx, req.UID)
	if err == nil || agentapi.IsNotFound(err) {
		return nil
	}
	var ae *agentapi.Error
	if !errors.As(err, &ae) && !netnsExists(args.Netns) {
		return nil
	}
	return agentError("unenrol pod "+req.UID, conf.AgentSocket, err)
}

// otherSandbox reports whether a DEL in netns path is for another sandbox
// of the pod than the one enrolled: kubelet deletes a pod's failed and
// dead sandboxes (the same pod UID) while a newer one runs, and such a
// DEL must not unenrol the running one. It is another sandbox when path
// names a live namespace other than the enrolled one, or when path is
// gone while the enrolled namespace still lives.
func otherSandbox(st agentapi.PodStatus, path string) bool {
	if path != "" {
		if ns, err := netns.Open(path); err == nil {
			id, err := ns.ID()
			ns.Close()
			return err == nil && id != st.NetnsID
		}
	}
	return st.Datapath != nil && st.Datapath.NetnsAlive
}

func netnsExists(path string) bool {
	if path == "" {
		return false
	}
	ns, err := netns.Open(path)
	if err != nil {
		return false
	}
	ns.Close()
	return true
}

// Check verifies that the agent knows the pod in this netns and that every
// program of its datapath is attached.
func Check(args *skel.CmdArgs) error {
	conf, req, err := load(args)
	if err != nil {
		return err
	}
	if conf.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "CHECK needs a prevResult", "")
	}
	ctx, cancel := context.WithTimeout(context.Background(), otherTimeout)
	defer cancel()
	st, err := agentapi.NewClient(conf.AgentSocket).Pod(ctx, req.UID)
	if err != nil {
		return agentError("check pod "+req.UID, conf.AgentSocket, err)
	}
	fail := func(format string, a ...any) error {
		return types.NewError(types.ErrInternal, fmt.Sprintf("check pod %s: ", req.UID)+fmt.Sprintf(format, a...), "")
	}
	if st.Datapath == nil {
		return fail("datapath not readable: %s", st.DatapathError)
	}
	if !st.Datapath.Attached() {
		return fail("datapath not fully attached: %+v", st.Datapath.Attachments)
	}
	ns, err := netns.Open(args.Netns)
	if err != nil {
		return fail("%v", err)
	}
	defer ns.Close()
	if id, err := ns.ID(); err != nil || id != st.NetnsID {
		return fail("enrolled with another network namespace (%s)", st.Netns)
	}
	return nil
}

// Status succeeds when the agent answers and is ready.
func Status(args *skel.CmdArgs) error {
	conf, err := parseConfig(args)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), otherTimeout)
	defer cancel()
	st, err := agentapi.NewClient(conf.AgentSocket).Status(ctx)
	if err != nil {
		return types.NewError(types.ErrPluginNotAvailable, fmt.Sprintf("the ambpf agent is not reachable at %s", conf.AgentSocket), err.Error())
	}
	if !st.Ready {
		return types.NewError(types.ErrPluginNotAvailable, "the ambpf agent is not ready", "")
	}
	return nil
}
