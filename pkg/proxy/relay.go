//go:build linux

package proxy

import (
	"errors"
	"io"
	"net"
	"sync"

	"github.com/ambpf/ambpf/pkg/copybuf"
	"github.com/ambpf/ambpf/pkg/hbone"
	"github.com/ambpf/ambpf/pkg/metrics"
)

// relay copies client -> server and server -> client until both
// directions ended, and returns the first error. A direction that reaches
// EOF half-closes its destination, so an EOF travels end to end; a
// direction that fails closes both connections, which ends the other.
// Bytes are counted into mc as Istio does: from the client "received",
// toward the client "sent".
//
// Between two *net.TCPConn small messages go through a pooled buffer
// and bulk data is spliced in the kernel (copyTCP); otherwise the copy
// goes through a pooled buffer and counts as it goes. An HBONE tunnel
// (*hbone.Conn) half-closes like TCP over both transports, so each
// direction lasts until its own end of data. With noSpliceClient the
// client is never read with splice: under the fast path its bytes arrive
// where only recvmsg looks (pkg/fastpath).
func relay(client, server net.Conn, mc *metrics.Conn, noSpliceClient bool) error {
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error
	)
	fail := func(err error) {
		once.Do(func() {
			first = err
			client.Close()
			server.Close()
		})
	}
	wg.Go(func() {
		if err := oneWay(server, client, mc.AddReceived, !noSpliceClient); err != nil {
			fail(err)
		}
	})
	if err := oneWay(client, server, mc.AddSent, true); err != nil {
		fail(err)
	}
	wg.Wait()
	return first
}

// oneWay copies src to dst, then half-closes dst; splice says whether
// bulk data between two TCP connections may be spliced.
func oneWay(dst, src net.Conn, count func(int), splice bool) error {
	var err error
	dt, dok := dst.(*net.TCPConn)
	st, sok := src.(*net.TCPConn)
	hc, hok := src.(*hbone.Conn)
	switch {
	case dok && sok && splice:
		err = copyTCP(dt, st, count)
	case hok:
		// The tunnel's read loop writes small messages to dst itself.
		_, err = hc.DeliverTo(dst, count)
	default:
		err = copyCounted(dst, src, count)
	}
	if err != nil {
		return err
	}
	if cw, ok := dst.(interface{ CloseWrite() error }); ok {
		if err := cw.CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) {
			return err
		}
		return nil
	}
	return dst.Close()
}

// copyTCP copies between two TCP connections: through a small pooled
// buffer (read, write: no pipe, no splice setup per message) while
// messages are small, then, from the first read that fills the buffer,
// with io.Copy, which splices in the kernel. Bytes are counted as they
// go on the first path and when the direction ends on the second.
func copyTCP(dst, src *net.TCPConn, count func(int)) error {
	_, bulk, err := copybuf.Copy(dst, src, count, true)
	if err != nil || !bulk {
		return err
	}
	n, err := io.Copy(dst, src)
	count(int(n))
	return err
}

// copyCounted copies src to dst through pooled buffers (growing with
// bulk traffic), calling count after every write. It returns nil at src's
// EOF.
func copyCounted(dst io.Writer, src io.Reader, count func(int)) error {
	_, _, err := copybuf.Copy(dst, src, count, false)
	return err
}
