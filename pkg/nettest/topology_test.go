//go:build linux

package nettest

import (
	"bufio"
	"context"
	"os"
	"strings"
	"testing"
	"time"
)

func TestTopologyConnectivityAndCleanup(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	var names []string
	var cgroup string
	t.Run("build", func(t *testing.T) {
		topo := NewTopology(t, 2)
		names = append(names, topo.Node.NSName)
		for _, p := range topo.Pods {
			names = append(names, p.NSName)
			if _, err := os.Stat(p.NSPath); err != nil {
				t.Fatalf("netns file: %v", err)
			}
		}
		a, r := topo.Pod(0), topo.Pod(1)
		for _, v6 := range []bool{false, true} {
			l, err := r.Listen("tcp", "[::]:7000")
			if err != nil {
				t.Fatal(err)
			}
			go func() {
				c, err := l.Accept()
				if err != nil {
					return
				}
				c.Write([]byte(c.RemoteAddr().String() + "\n"))
				c.Close()
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			c, err := a.Dial(ctx, "tcp", netipJoin(r.Addr(v6), 7000))
			cancel()
			if err != nil {
				l.Close()
				t.Fatalf("v6=%v: %v", v6, err)
			}
			line, err := bufio.NewReader(c).ReadString('\n')
			c.Close()
			l.Close()
			if err != nil || !strings.Contains(line, a.Addr(v6).String()) {
				t.Fatalf("v6=%v: got %q, %v; want peer %s", v6, line, err, a.Addr(v6))
			}
		}
		out, err := a.Exec(context.Background(), "ip", "-o", "addr", "show", "dev", "eth0")
		if err != nil || !strings.Contains(string(out), a.IPv6.String()) {
			t.Fatalf("ip netns exec: %s %v", out, err)
		}
		var err2 error
		if cgroup, err2 = a.Cgroup(); err2 != nil {
			t.Fatal(err2)
		}
		// A process left running must be killed by the cleanup.
		if err := a.Command(context.Background(), "sleep", "300").Start(); err != nil {
			t.Fatal(err)
		}
		cmd := a.Command(context.Background(), "cat", "/proc/self/cgroup")
		out, err = cmd.Output()
		if err != nil || !strings.Contains(string(out), topo.Prefix+topo.ID+"/pod0") {
			t.Fatalf("pod command cgroup: %q %v", out, err)
		}
	})
	if _, err := os.Stat(cgroup); !os.IsNotExist(err) {
		t.Errorf("cgroup %s left behind (stat: %v)", cgroup, err)
	}
	for _, n := range names {
		if _, err := os.Stat("/run/netns/" + n); !os.IsNotExist(err) {
			t.Errorf("netns %s left behind (stat: %v)", n, err)
		}
	}
}
