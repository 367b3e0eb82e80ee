package bench

import (
	"math"
	"slices"
	"time"
)

// Summary describes one number measured once per round.
type Summary struct {
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	// Spread is (Max-Min)/Median: how far apart the rounds were.
	Spread float64 `json:"spread"`
	N      int     `json:"n"`
}

// Summarize summarizes the values of the rounds; NaNs (failed rounds) are
// left out. With no value left it is the zero Summary (N == 0).
func Summarize(values []float64) Summary {
	var xs []float64
	for _, v := range values {
		if !math.IsNaN(v) {
			xs = append(xs, v)
		}
	}
	if len(xs) == 0 {
		return Summary{}
	}
	slices.Sort(xs)
	s := Summary{Median: median(xs), Min: xs[0], Max: xs[len(xs)-1], N: len(xs)}
	if s.Median != 0 {
		s.Spread = (s.Max - s.Min) / s.Median
	}
	return s
}

// median of sorted values: the middle one, or the mean of the middle two.
func median(sorted []float64) float64 {
	n := len(sorted)
	if n == 0 {
		return math.NaN()
	}
	if n%2 == 1 {
		return sorted[n/2]
	}
	return (sorted[n/2-1] + sorted[n/2]) / 2
}

// percentile of sorted latencies, by the nearest-rank method: the smallest
// value that at least p percent of the values are at or below.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	return sorted[min(max(rank, 1), len(sorted))-1]
}

// ratios divides each round's value by the baseline's value in the same
// round. Configurations run next to each other in a round, so their ratio
// is less exposed to the machine's drift than a ratio of medians.
func ratios(values, baseline []float64) []float64 {
	out := make([]float64, len(values))
	for i := range values {
		if i >= len(baseline) || baseline[i] == 0 {
			out[i] = math.NaN()
			continue
		}
		out[i] = values[i] / baseline[i]
	}
	return out
}
