//go:build linux

package agent

import "sync"

// podLocks serialises the operations on one pod (enrol, unenrol, a retry,
// the netns check's unenrol, dropping an unclaimed pin) while operations
// on different pods run in parallel. An enrolment may wait seconds on a
// proxy; with one lock for the node, a burst of CNI ADDs queued behind
// each other and the last ones hit the runtime's timeout. The datapath
// and the ZDS server are safe for concurrent use (the loader takes its
// own per-pod locks; ZDS calls queue on the proxy's connection), so the
// agent only needs to keep one pod's steps in order.
type podLocks struct {
	mu sync.Mutex
	m  map[string]*podLock
}

type podLock struct {
	sync.Mutex
	refs int // holders and waiters; the entry goes when it drops to 0
}

// lock takes uid's lock, waiting for its holder, and returns the unlock.
func (p *podLocks) lock(uid string) (unlock func()) {
	p.mu.Lock()
	if p.m == nil {
		p.m = map[string]*podLock{}
	}
	l := p.m[uid]
	if l == nil {
		l = &podLock{}
		p.m[uid] = l
	}
	l.refs++
	p.mu.Unlock()
	l.Lock()
	return func() {
		l.Unlock()
		p.mu.Lock()
		if l.refs--; l.refs == 0 {
			delete(p.m, uid)
		}
		p.mu.Unlock()
	}
}
