package ca

import (
	"sync"

	"golang.org/x/time/rate"
)

// maxLimiters bounds the limiter map: past it the map is emptied, which
// at worst gives every caller a fresh burst once, instead of letting a
// stream of new keys grow memory without bound.
const maxLimiters = 65536

// limiters is a token bucket per key (a caller pod, a peer address).
type limiters struct {
	rate  rate.Limit
	burst int
	mu    sync.Mutex
	m     map[string]*rate.Limiter
}

func newLimiters(perSecond float64, burst int) *limiters {
	return &limiters{rate: rate.Limit(perSecond), burst: burst, m: map[string]*rate.Limiter{}}
}

// allow takes a token of key's bucket, reporting whether there was one.
func (l *limiters) allow(key string) bool {
	l.mu.Lock()
	lim, ok := l.m[key]
	if !ok {
		if len(l.m) >= maxLimiters {
			clear(l.m)
		}
		lim = rate.NewLimiter(l.rate, l.burst)
		l.m[key] = lim
	}
	l.mu.Unlock()
	return lim.Allow()
}
