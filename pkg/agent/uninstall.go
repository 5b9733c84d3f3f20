//go:build linux

package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/probesnat"
)

// uninstallTimeout bounds the Uninstalling question: the pod's
// termination grace period must still leave time for the clean-up.
const uninstallTimeout = 10 * time.Second

// uninstalling asks Config.Uninstalling, after a clean stop, whether the
// agent is being removed from the node. The servers and the controller
// have stopped by then: nothing enrols any more.
func (a *Agent) uninstalling() bool {
	if a.cfg.Uninstalling == nil {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), uninstallTimeout)
	defer cancel()
	return a.cfg.Uninstalling(ctx)
}

// uninstall unenrols every pod (its datapath and probe SNAT detached, so
// it keeps running, uncaptured), detaches pinned pods the state does not
// know, and removes the node-wide pins of both loaders: afterwards no
// program, map, qdisc or cgroup attachment of the agent is left. The ZDS
// server is closed by then, so the proxies hear no Del: they are deleted
// by the same uninstall, and with the capture gone no traffic reaches
// their in-pod listeners.
func (a *Agent) uninstall() error {
	start := time.Now()
	pods := a.snapshotPods()
	a.log.Info("uninstall: the agent's DaemonSet is gone; unenrolling every pod", "pods", len(pods))
	var errs []error
	ctx := context.Background()
	for _, p := range pods {
		if aerr := a.unenroll(ctx, p.UID, false); aerr != nil && aerr.Code != agentapi.CodeNotFound {
			errs = append(errs, aerr)
		}
	}
	if pinned, err := a.dp.List(); err != nil {
		errs = append(errs, err)
	} else {
		for _, st := range pinned {
			if err := a.dp.Detach(st.UID); err != nil && !errors.Is(err, datapath.ErrNotAttached) {
				errs = append(errs, err)
			}
		}
	}
	if a.probes != nil {
		if left, err := a.probes.List(); err != nil {
			errs = append(errs, err)
		} else {
			for _, st := range left {
				if err := a.probes.Detach(st.Interface); err != nil && !errors.Is(err, probesnat.ErrNotAttached) {
					errs = append(errs, err)
				}
			}
		}
		errs = append(errs, a.probes.RemoveNodeState())
	}
	if a.fp != nil {
		errs = append(errs, removeFastPath(a.fp))
	}
	errs = append(errs, a.dp.RemoveNodeState())
	if err := errors.Join(errs...); err != nil {
		a.log.Error("uninstall left state behind", "err", err, "took", time.Since(start))
		return fmt.Errorf("uninstall: %w", err)
	}
	a.log.Info("uninstalled: every pod unenrolled, the node's pins removed", "pods", len(pods), "took", time.Since(start))
	return nil
}
