//go:build linux

package zds

import (
	"context"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestSocketPathGuarded removes the server's socket file under a connected
// proxy, then replaces it with another process's socket. Each time the
// server must listen at the path again, so that the next proxy reaches it
// (and not the impostor), while the proxy already connected stays
// connected.
func TestSocketPathGuarded(t *testing.T) {
	path := sockPath(t)
	src := &podList{}
	src.set(Pod{UID: "p", Info: info("p"), OpenNetns: opener(selfNetns)})
	srv, err := NewServer(ServerConfig{Path: path, Snapshot: src, Timeout: testTimeout, ProbeInterval: testProbe,
		PathCheckInterval: 20 * time.Millisecond, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	first, _, _ := startClient(t, path, newFakeHandler())
	waitFor(t, "first proxy synced", func() bool { return srv.Status().Synced == 1 })

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the socket back at its path", func() bool {
		var st unix.Stat_t
		return unix.Stat(path, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFSOCK
	})
	startClient(t, path, newFakeHandler())
	waitFor(t, "a proxy connected after the removal", func() bool { return srv.Status().Synced == 2 })

	// Another socket at the path: the server takes it back.
	os.Remove(path)
	impostor, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	impostor.SetUnlinkOnClose(false)
	t.Cleanup(func() { impostor.Close() })
	var ist unix.Stat_t
	if err := unix.Stat(path, &ist); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the path taken back from the impostor", func() bool {
		var st unix.Stat_t
		return unix.Stat(path, &st) == nil && st.Ino != ist.Ino
	})
	startClient(t, path, newFakeHandler())
	waitFor(t, "a proxy connected after the replacement", func() bool { return srv.Status().Synced == 3 })
	if !first.Ready() {
		t.Error("the first proxy lost its connection")
	}

}

// TestStopReconnecting checks that a draining proxy's client, once its
// connection ends, returns from Run instead of connecting to the next
// agent (where it would become the newest connection).
func TestStopReconnecting(t *testing.T) {
	path := sockPath(t)
	srv, stop := startServer(t, path, &podList{})
	cl, runDone, _ := startClient(t, path, newFakeHandler())
	waitFor(t, "client synced", func() bool { return srv.Status().Synced == 1 })
	cl.StopReconnecting()
	stop()
	select {
	case err := <-runDone:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after the connection ended")
	}
	srv2, _ := startServer(t, path, &podList{})
	if n := srv2.Status().Connections; n != 0 {
		t.Errorf("%d connections to the next agent, want none", n)
	}
}
