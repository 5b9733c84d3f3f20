// Package promtext reads a Prometheus text exposition the way a scraper
// does, with Prometheus' own parser (expfmt), for tests that check what
// the proxy exposes. It is imported by tests only, so no binary links the
// parser.
package promtext

import (
	"fmt"
	"strings"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Parse parses a scrape into its metric families, keyed by name. An
// exposition the parser refuses is an error: a real scraper would drop it.
func Parse(body string) (map[string]*dto.MetricFamily, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("exposition does not parse: %w", err)
	}
	return fams, nil
}

// Find returns the first series of f whose labels include want (nil when
// none does, or f is nil).
func Find(f *dto.MetricFamily, want map[string]string) *dto.Metric {
	if f == nil {
		return nil
	}
next:
	for _, m := range f.Metric {
		got := map[string]string{}
		for _, l := range m.Label {
			got[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if got[k] != v {
				continue next
			}
		}
		return m
	}
	return nil
}

// Value is a counter's, gauge's or untyped series' value.
func Value(m *dto.Metric) float64 {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Untyped != nil:
		return m.Untyped.GetValue()
	}
	return 0
}

// Sum adds the values (as Value reads them) of every series of f whose
// labels include want; 0 when none does or f is nil.
func Sum(f *dto.MetricFamily, want map[string]string) float64 {
	if f == nil {
		return 0
	}
	var sum float64
	for _, m := range f.Metric {
		if Find(&dto.MetricFamily{Metric: []*dto.Metric{m}}, want) != nil {
			sum += Value(m)
		}
	}
	return sum
}
