// Package copybuf copies between connections through pooled buffers that
// grow with the traffic: a connection exchanging small messages holds a
// small buffer, one moving bulk data gets a large one (few syscalls, large
// HTTP/2 DATA frames, full TLS records).
package copybuf

import (
	"io"
	"sync"
)

// Buffer sizes: Small while reads come back shorter than the buffer,
// Large from the first read that fills it.
const (
	Small = 32 << 10
	Large = 256 << 10
)

var (
	small = sync.Pool{New: func() any { b := make([]byte, Small); return &b }}
	large = sync.Pool{New: func() any { b := make([]byte, Large); return &b }}
)

// Copy copies src to dst until src's EOF (then it returns nil) or an
// error, calling count, if set, after every write with the bytes written.
// With stopAtBulk it returns (bulk=true, err=nil) instead of growing at
// the first read that fills the small buffer, for callers that move bulk
// data another way (splice).
func Copy(dst io.Writer, src io.Reader, count func(int), stopAtBulk bool) (n int64, bulk bool, err error) {
	pool := &small
	bp := pool.Get().(*[]byte)
	defer func() { pool.Put(bp) }()
	buf := *bp
	for {
		nr, rerr := src.Read(buf)
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
			n += int64(nw)
			if nw > 0 && count != nil {
				count(nw)
			}
			if werr != nil {
				return n, false, werr
			}
		}
		if rerr == io.EOF {
			return n, false, nil
		}
		if rerr != nil {
			return n, false, rerr
		}
		if nr == len(buf) && pool == &small {
			if stopAtBulk {
				return n, true, nil
			}
			pool.Put(bp)
			pool = &large
			bp = pool.Get().(*[]byte)
			buf = *bp
		}
	}
}
