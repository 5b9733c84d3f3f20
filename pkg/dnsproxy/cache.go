package dnsproxy

import (
	"strings"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// DefaultCacheSize is how many upstream answers a Server keeps when
// Config.CacheSize is 0.
const DefaultCacheSize = 1024

// cache keeps upstream answers for as long as their TTLs allow, so that a
// pod asking the same name again is answered without a round trip (as
// ztunnel's resolver caches). Only complete NOERROR and NXDOMAIN answers
// are kept; a hit is served with its TTLs lowered by the time spent in
// the cache.
type cache struct {
	max int
	now func() time.Time

	mu      sync.Mutex
	entries map[string]cacheEntry
}

type cacheEntry struct {
	msg     dnsmessage.Message
	stored  time.Time
	expires time.Time
}

func newCache(size int) *cache {
	if size == 0 {
		size = DefaultCacheSize
	}
	return &cache{max: size, now: time.Now, entries: map[string]cacheEntry{}}
}

// key identifies a question; answers over TCP and to EDNS clients may be
// larger than a plain UDP client can take, so those are kept apart.
func cacheKey(q *dnsmessage.Message, network string) string {
	edns := false
	for _, r := range q.Additionals {
		if r.Header.Type == dnsmessage.TypeOPT {
			edns = true
		}
	}
	qq := q.Questions[0]
	return strings.ToLower(qq.Name.String()) + "|" + qq.Type.String() + "|" + qq.Class.String() + "|" + network + "|" + map[bool]string{true: "edns", false: ""}[edns]
}

// get returns the cached answer to query, or nil.
func (c *cache) get(query *dnsmessage.Message, network string) []byte {
	if c == nil || c.max < 0 {
		return nil
	}
	k := cacheKey(query, network)
	c.mu.Lock()
	e, ok := c.entries[k]
	now := c.now()
	if ok && !now.Before(e.expires) {
		delete(c.entries, k)
		ok = false
	}
	c.mu.Unlock()
	if !ok {
		return nil
	}
	age := uint32(now.Sub(e.stored) / time.Second)
	m := e.msg
	m.ID, m.RecursionDesired, m.Questions = query.ID, query.RecursionDesired, query.Questions
	m.Answers, m.Authorities, m.Additionals = aged(m.Answers, age), aged(m.Authorities, age), aged(m.Additionals, age)
	b, err := m.Pack()
	if err != nil {
		return nil
	}
	return b
}

// aged copies rs with every TTL lowered by age (OPT carries no TTL).
func aged(rs []dnsmessage.Resource, age uint32) []dnsmessage.Resource {
	out := make([]dnsmessage.Resource, len(rs))
	for i, r := range rs {
		if r.Header.Type != dnsmessage.TypeOPT {
			r.Header.TTL -= min(age, r.Header.TTL)
		}
		out[i] = r
	}
	return out
}

// put keeps resp, the upstream answer to query, for its lowest TTL.
func (c *cache) put(query *dnsmessage.Message, network string, resp []byte) {
	if c == nil || c.max < 0 {
		return
	}
	var m dnsmessage.Message
	if m.Unpack(resp) != nil || m.Truncated || (m.RCode != dnsmessage.RCodeSuccess && m.RCode != dnsmessage.RCodeNameError) {
		return
	}
	ttl, ok := minTTL(&m)
	if !ok || ttl == 0 {
		return
	}
	now := c.now()
	k := cacheKey(query, network)
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, exists := c.entries[k]; !exists && len(c.entries) >= c.max {
		for key, e := range c.entries {
			if !now.Before(e.expires) {
				delete(c.entries, key)
			}
		}
		for key := range c.entries {
			if len(c.entries) < c.max {
				break
			}
			delete(c.entries, key) // any one: the map's order is random
		}
	}
	c.entries[k] = cacheEntry{msg: m, stored: now, expires: now.Add(time.Duration(ttl) * time.Second)}
}

// minTTL is the lowest TTL of the answer's records, for a negative
// answer the SOA's (RFC 2308: the lower of its TTL and MINIMUM); false
// when there is nothing to take a TTL from.
func minTTL(m *dnsmessage.Message) (uint32, bool) {
	var ttl uint32
	found := false
	take := func(t uint32) {
		if !found || t < ttl {
			ttl, found = t, true
		}
	}
	for _, sec := range [][]dnsmessage.Resource{m.Answers, m.Authorities, m.Additionals} {
		for _, r := range sec {
			if r.Header.Type == dnsmessage.TypeOPT {
				continue
			}
			take(r.Header.TTL)
			if soa, ok := r.Body.(*dnsmessage.SOAResource); ok {
				take(soa.MinTTL)
			}
		}
	}
	if len(m.Answers) == 0 {
		// NODATA or NXDOMAIN: cacheable only with an SOA.
		hasSOA := false
		for _, r := range m.Authorities {
			if r.Header.Type == dnsmessage.TypeSOA {
				hasSOA = true
			}
		}
		if !hasSOA {
			return 0, false
		}
	}
	return ttl, found
}
