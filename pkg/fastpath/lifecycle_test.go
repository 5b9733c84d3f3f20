//go:build linux

package fastpath

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// TestProxyRestartFailsClosed: when the proxy goes, its sockets leave
// fp_socks; what the app sends then goes through TCP, where capture finds
// no proxy socket: B never receives it. A new proxy is paired again.
func TestProxyRestartFailsClosed(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		t.Run(map[bool]string{false: "v4", true: "v6"}[v6], func(t *testing.T) {
			l := newLab(t, Both)
			var received atomic.Int64
			dst := l.serve(t, v6, func(c *net.TCPConn) {
				buf := make([]byte, 4096)
				for {
					n, err := c.Read(buf)
					received.Add(int64(n))
					if err != nil {
						return
					}
					c.Write(buf[:n])
				}
			})
			fd := l.dial(t, dst)
			if err := writeAll(fd, []byte("one")); err != nil {
				t.Fatal(err)
			}
			if b, err := readFull(fd, 3); err != nil || string(b) != "one" {
				t.Fatalf("echo: %q %v", b, err)
			}
			before := l.counters(t)
			if before.Paired == 0 || before.BytesToProxy == 0 {
				t.Fatalf("not on the fast path: %+v", before)
			}
			l.proxy.Close()
			// The proxy's socket closed: the app reads EOF (its FIN, over TCP).
			if rest, err := readAll(fd); err != nil || len(rest) != 0 {
				t.Fatalf("after the proxy closed: %q %v", rest, err)
			}
			writeAll(fd, []byte("two")) // may fail; must never reach B
			waitFor(t, "the app's send to fall back to TCP", func() bool { return l.counters(t).Fallback > before.Fallback })

			l.startProxy(t)
			fd2 := l.dial(t, dst)
			if err := writeAll(fd2, []byte("three")); err != nil {
				t.Fatal(err)
			}
			if b, err := readFull(fd2, 5); err != nil || string(b) != "three" {
				t.Fatalf("echo through the new proxy: %q %v", b, err)
			}
			if got := received.Load(); got != 3+5 {
				t.Errorf("B received %d bytes, want 8 (\"one\" and \"three\"): the send after the proxy left went around it", got)
			}
			after := l.counters(t)
			if after.Paired != before.Paired+1 {
				t.Errorf("new connection not paired: %+v", after)
			}
			st, err := l.dp.Get(podUID)
			if err != nil {
				t.Fatal(err)
			}
			if st.Counters.CapturedOut != 2 {
				t.Errorf("capture counted %d outbound connections, want 2", st.Counters.CapturedOut)
			}
		})
	}
}

// TestPairingAndGuard: only the app's socket and the proxy's accepted
// socket are recorded (the proxy's upstream socket to B is not), bpftool
// prints the maps with field names, and the mark guard still refuses the
// pod's processes the proxy mark.
func TestPairingAndGuard(t *testing.T) {
	l := newLab(t, ToProxy)
	dst := l.serve(t, false, func(c *net.TCPConn) { io.Copy(c, c) })
	fd := l.dial(t, dst)
	if err := writeAll(fd, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := readFull(fd, 1); err != nil {
		t.Fatal(err)
	}
	meta, err := ebpf.LoadPinnedMap(l.fp.pin(pinMeta), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer meta.Close()
	var (
		k    fastpathFpKey
		v    fastpathFpSock
		keys []fastpathFpKey
		vals []fastpathFpSock
	)
	for it := meta.Iterate(); it.Next(&k, &v); {
		keys, vals = append(keys, k), append(vals, v)
	}
	if len(keys) != 2 {
		t.Fatalf("%d sockets recorded, want 2 (app and proxy): %+v", len(keys), keys)
	}
	b := dst.Addr().As4()
	for i, k := range keys {
		remote := netip.AddrFrom4([4]byte{byte(k.Remote[0]), byte(k.Remote[0] >> 8), byte(k.Remote[0] >> 16), byte(k.Remote[0] >> 24)})
		switch vals[i].Role {
		case 1: // app: connected to B's address (the original destination)
			if remote != netip.AddrFrom4(b) || k.Rport != dst.Port() {
				t.Errorf("app socket recorded with peer %s:%d, want %s", remote, k.Rport, dst)
			}
		case 2: // proxy: its accepted socket, local address = B's
			if k.Lport != dst.Port() {
				t.Errorf("proxy socket recorded with local port %d, want %d (the accepted socket, not the upstream one)", k.Lport, dst.Port())
			}
		default:
			t.Errorf("socket with role %d", vals[i].Role)
		}
		if vals[i].Pod != l.index {
			t.Errorf("socket counted for pod %d, want %d", vals[i].Pod, l.index)
		}
	}
	if _, err := exec.LookPath("bpftool"); err == nil {
		// The kernel takes no BTF for a sockhash (cilium/ebpf then creates
		// it without); fp_meta, with the same keys, is the readable view.
		out, err := exec.CommandContext(context.Background(), "bpftool", "-j", "map", "dump", "pinned", filepath.Join(l.fp.dir, pinSocks)).Output()
		var socks []json.RawMessage
		if err != nil || json.Unmarshal(out, &socks) != nil || len(socks) != len(keys) {
			t.Errorf("bpftool map dump fp_socks: %d entries, want %d (%v)", len(socks), len(keys), err)
		}
		for _, m := range []string{pinMeta, pinStats} {
			out, err := exec.CommandContext(context.Background(), "bpftool", "-j", "map", "dump", "pinned", filepath.Join(l.fp.dir, m)).Output()
			if err != nil {
				t.Fatalf("bpftool map dump %s: %v", m, err)
			}
			var entries []struct {
				Formatted map[string]any `json:"formatted"`
			}
			if err := json.Unmarshal(out, &entries); err != nil || len(entries) == 0 || entries[0].Formatted == nil {
				t.Errorf("bpftool map dump %s: no BTF-formatted entries (%v): %.300s", m, err, out)
			}
		}
	} else {
		t.Log("bpftool not installed: BTF dump not checked")
	}
	errno, err := l.factory.MarkErrno()
	if err != nil {
		t.Fatal(err)
	}
	if errno != unix.EPERM {
		t.Errorf("pod process setting SO_MARK 0x539: errno %v, want EPERM (mark guard)", errno)
	}
}

// TestUpgradeKeepsConnections: a loader of another build swaps the
// programs (sk_msg on the map, the proxy's link) and keeps the maps, so a
// connection already on the fast path goes on being redirected, intact.
func TestUpgradeKeepsConnections(t *testing.T) {
	l := newLab(t, Both)
	dst := l.serve(t, false, func(c *net.TCPConn) { io.Copy(c, c) })
	fd := l.dial(t, dst)
	echo := func(msg string) {
		t.Helper()
		if err := writeAll(fd, []byte(msg)); err != nil {
			t.Fatal(err)
		}
		if b, err := readFull(fd, len(msg)); err != nil || string(b) != msg {
			t.Fatalf("echo %q: %q %v", msg, b, err)
		}
	}
	echo("before")
	oldMsg, err := ebpf.LoadPinnedProgram(l.fp.pin(pinProgMsg), nil)
	if err != nil {
		t.Fatal(err)
	}
	oldInfo, _ := oldMsg.Info()
	oldMsg.Close()
	// Pretend the pinned programs are another build's.
	build, err := ebpf.LoadPinnedMap(l.fp.pin(pinBuild), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := build.Put(uint32(0), uint64(1)); err != nil {
		t.Fatal(err)
	}
	build.Close()
	before := l.counters(t)
	if err := l.fp.Verify(); err != nil {
		t.Fatal(err)
	}
	newMsg, err := ebpf.LoadPinnedProgram(l.fp.pin(pinProgMsg), nil)
	if err != nil {
		t.Fatal(err)
	}
	newInfo, _ := newMsg.Info()
	newMsg.Close()
	if id1, _ := oldInfo.ID(); func() bool { id2, _ := newInfo.ID(); return id1 == id2 }() {
		t.Fatal("the programs were not swapped")
	}
	echo("after the upgrade")
	after := l.counters(t)
	if after.BytesToProxy-before.BytesToProxy != uint64(len("after the upgrade")) || after.BytesToApp == before.BytesToApp {
		t.Errorf("the live connection left the fast path: %+v -> %+v", before, after)
	}
}

// blockedReadAfterShutRD reads from a fresh app socket on a locked thread
// and, once that thread sleeps in read(2), shuts the socket's read side
// from another: what the read then answers.
func blockedReadAfterShutRD(t *testing.T, l *lab) string {
	dst := l.serve(t, false, func(c *net.TCPConn) { io.Copy(io.Discard, c) })
	fd := l.dial(t, dst)
	type answer struct {
		n   int
		err error
	}
	tidc, res := make(chan int, 1), make(chan answer, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		tidc <- unix.Gettid()
		n, err := unix.Read(fd, make([]byte, 16))
		res <- answer{n, err}
	}()
	tid := <-tidc
	waitFor(t, "the reader asleep in read(2)", func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/syscall", tid))
		st, serr := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/stat", tid))
		// syscall: "0 <fd in hex> ..." is read(2) on fd; stat field 3 is S when asleep.
		return err == nil && serr == nil && strings.HasPrefix(string(b), fmt.Sprintf("0 0x%x ", fd)) &&
			strings.Contains(string(st), ") S ")
	})
	if err := unix.Shutdown(fd, unix.SHUT_RD); err != nil {
		t.Fatal(err)
	}
	a := <-res
	return fmt.Sprintf("n=%d err=%v", a.n, a.err)
}

// TestBlockingReadDeviation pins down the receive-side deviation every
// socket in a sockmap has on the kernels measured (docs/KERNELS.md): a
// blocking read woken without data answers EAGAIN (tcp_bpf_recvmsg waits
// once) where TCP's answers what woke it; here the wake-up is a shutdown
// of the read side, which TCP answers with EOF. Fails when a kernel no
// longer deviates, so the docs and the default can be revisited.
func TestBlockingReadDeviation(t *testing.T) {
	tcp := blockedReadAfterShutRD(t, newLab(t, Off))
	if tcp != "n=0 err=<nil>" {
		t.Fatalf("without the fast path: %s, want EOF", tcp)
	}
	fast := blockedReadAfterShutRD(t, newLab(t, ToProxy))
	if fast == tcp {
		t.Fatalf("with the fast path the blocked read answered as TCP does (%s): the deviation in docs/KERNELS.md is gone", fast)
	}
	t.Logf("without the fast path %s; with it (to-proxy) %s", tcp, fast)
}
