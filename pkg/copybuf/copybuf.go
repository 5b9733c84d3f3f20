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

// Buffer is a pooled copy buffer that starts Small and grows to Large
// at the first read that fills it. The zero value is ready; Release
// returns it to its pool.
type Buffer struct {
	bp   *[]byte
	pool *sync.Pool
}

// Bytes is the buffer to read into, taken from its pool on first use.
func (b *Buffer) Bytes() []byte {
	if b.bp == nil {
		if b.pool == nil {
			b.pool = &small
		}
		b.bp = b.pool.Get().(*[]byte)
	}
	return *b.bp
}

// Filled tells the buffer that a read returned n bytes: when that filled
// a small buffer it grows, and Filled reports true.
func (b *Buffer) Filled(n int) (grew bool) {
	if b.pool == &large || b.bp == nil || n < len(*b.bp) {
		return false
	}
	b.Release()
	b.pool = &large
	return true
}

// Release puts the buffer back in its pool; Bytes takes one again.
func (b *Buffer) Release() {
	if b.bp != nil {
		b.pool.Put(b.bp)
		b.bp = nil
	}
}

// Copy copies src to dst until src's EOF (then it returns nil) or an
// error, calling count, if set, after every write with the bytes written.
// With stopAtBulk it returns (bulk=true, err=nil) instead of growing at
// the first read that fills the small buffer, for callers that move bulk
// data another way (splice).
func Copy(dst io.Writer, src io.Reader, count func(int), stopAtBulk bool) (n int64, bulk bool, err error) {
	var b Buffer
	defer b.Release()
	for {
		buf := b.Bytes()
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
		if nr == len(buf) && b.pool == &small && stopAtBulk {
			return n, true, nil
		}
		b.Filled(nr)
	}
}
