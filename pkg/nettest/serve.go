//go:build linux

package nettest

import (
	"net"
	"sync"
	"testing"
	"time"
)

// Serve accepts connections on ln until tb ends and runs handle for each
// in a goroutine of its own, with a deadline of timeout on the connection
// (none when zero), closing the connection when handle returns. The
// cleanup closes ln and waits for every handler.
func Serve(tb testing.TB, ln net.Listener, timeout time.Duration, handle func(net.Conn)) {
	var wg sync.WaitGroup
	tb.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				if timeout > 0 {
					c.SetDeadline(time.Now().Add(timeout))
				}
				handle(c)
			})
		}
	})
}
