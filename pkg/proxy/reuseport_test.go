//go:build linux

package proxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/kernfeat"
	"github.com/ambpf/ambpf/pkg/zds"
)

// TestZDSReusePortDecidesListeners: ambpf's ambpf_reuseport in a pod's
// ZDS Add (sent over a real ZDS socket) decides whether the pod's
// listeners, TCP, DNS and HTTP/3 alike, carry SO_REUSEPORT: allowed puts
// it on and refused leaves it off, whatever the kernel's version says;
// an Add without it (Istio's agent, an older ambpf-agent) falls back to
// the version (kernfeat.ReusePortAssign); --no-reuseport wins over the
// agent's allowed.
func TestZDSReusePortDecidesListeners(t *testing.T) {
	for _, c := range []struct {
		noReusePort bool
		agent       zds.ReusePort
		want        bool
	}{
		{false, zds.ReusePortAllowed, true},
		{false, zds.ReusePortRefused, false},
		{false, zds.ReusePortUnknown, kernfeat.ReusePortAssign()},
		{true, zds.ReusePortAllowed, false},
	} {
		t.Run(fmt.Sprintf("no-reuseport=%t/agent=%s", c.noReusePort, c.agent), func(t *testing.T) {
			e := newEnv(t, envOptions{pods: 1, zds: true, dns: true, h3: H3Config{Serve: true}, noReusePort: c.noReusePort})
			e.startZDS()
			pd := e.lab.Pod(0)
			uid := "uid-" + pd.Name + "-" + e.lab.ID
			info := zds.WorkloadInfo{Name: pd.Name, Namespace: "ns", ServiceAccount: "sa", ReusePort: c.agent}
			e.snap.put(zds.Pod{UID: uid, Info: info, OpenNetns: func() (*os.File, error) { return os.Open(pd.NSPath) }})
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := e.zdsSrv.Add(ctx, uid, info, pd.NS.File()); err != nil {
				t.Fatalf("zds add: %v", err)
			}
			e.p.mu.Lock()
			ppd := e.p.pods[uid]
			e.p.mu.Unlock()
			if ppd == nil {
				t.Fatal("no pod proxy after the Add")
			}
			if ppd.info.ReusePort != c.agent {
				t.Errorf("the proxy heard ambpf_reuseport %s, the agent sent %s", ppd.info.ReusePort, c.agent)
			}
			ppd.mu.Lock()
			listeners := append([]io.Closer(nil), ppd.listeners...)
			ppd.mu.Unlock()
			// 15001, 15006, 15008; DNS over TCP and UDP on two
			// addresses; HTTP/3 on 15008.
			if len(listeners) != 8 {
				t.Errorf("%d pod listeners, want 8", len(listeners))
			}
			for _, l := range listeners {
				sc, ok := l.(syscall.Conn)
				if !ok {
					t.Fatalf("listener %T has no socket", l)
				}
				if got := reusePortOpt(t, sc); got != c.want {
					t.Errorf("listener %v: SO_REUSEPORT %t, want %t", localAddr(l), got, c.want)
				}
			}
		})
	}
}

// localAddr names a listener (TCP or UDP) for messages.
func localAddr(l io.Closer) any {
	if a, ok := l.(interface{ LocalAddr() net.Addr }); ok {
		return a.LocalAddr()
	}
	if a, ok := l.(interface{ Addr() net.Addr }); ok {
		return a.Addr()
	}
	return l
}

// reusePortOpt reads SO_REUSEPORT back from a socket.
func reusePortOpt(t *testing.T, sc syscall.Conn) bool {
	t.Helper()
	rc, err := sc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var gerr error
	if err := rc.Control(func(fd uintptr) { v, gerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT) }); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatalf("getsockopt SO_REUSEPORT: %v", gerr)
	}
	return v != 0
}
