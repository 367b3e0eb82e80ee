package bench

import (
	"math"
	"testing"
	"time"
)

func TestSummarize(t *testing.T) {
	for _, c := range []struct {
		name   string
		values []float64
		want   Summary
	}{
		{"odd count", []float64{5, 1, 3}, Summary{Median: 3, Min: 1, Max: 5, Spread: 4.0 / 3, N: 3}},
		{"even count: mean of the middle two", []float64{4, 1, 2, 3}, Summary{Median: 2.5, Min: 1, Max: 4, Spread: 3 / 2.5, N: 4}},
		{"one value", []float64{7}, Summary{Median: 7, Min: 7, Max: 7, N: 1}},
		{"failed rounds are left out", []float64{math.NaN(), 10, math.NaN(), 20, 30}, Summary{Median: 20, Min: 10, Max: 30, Spread: 1, N: 3}},
		{"all failed", []float64{math.NaN(), math.NaN()}, Summary{}},
		{"none", nil, Summary{}},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := Summarize(c.values)
			if math.Abs(got.Spread-c.want.Spread) > 1e-12 {
				t.Errorf("spread %v, want %v", got.Spread, c.want.Spread)
			}
			got.Spread, c.want.Spread = 0, 0
			if got != c.want {
				t.Errorf("Summarize(%v) = %+v, want %+v", c.values, got, c.want)
			}
		})
	}
}

func TestSummarizeDoesNotReorderItsInput(t *testing.T) {
	values := []float64{3, 1, 2}
	Summarize(values)
	if values[0] != 3 || values[1] != 1 || values[2] != 2 {
		t.Errorf("summarize sorted the caller's rounds: %v", values)
	}
}

func TestPercentile(t *testing.T) {
	var lat []time.Duration
	for i := 1; i <= 100; i++ {
		lat = append(lat, time.Duration(i))
	}
	for _, c := range []struct {
		p    float64
		want time.Duration
	}{{50, 50}, {99, 99}, {100, 100}, {0, 1}, {1, 1}} {
		if got := percentile(lat, c.p); got != c.want {
			t.Errorf("p%v of 1..100 = %v, want %v", c.p, got, c.want)
		}
	}
	if got := percentile([]time.Duration{7}, 99); got != 7 {
		t.Errorf("p99 of one value = %v, want 7", got)
	}
	if got := percentile(nil, 50); got != 0 {
		t.Errorf("p50 of nothing = %v, want 0", got)
	}
}

func TestRatiosPairRounds(t *testing.T) {
	got := ratios([]float64{2, 6, math.NaN(), 8}, []float64{1, 3, 4, 0})
	want := []float64{2, 2, math.NaN(), math.NaN()}
	for i := range want {
		if !(got[i] == want[i] || math.IsNaN(got[i]) && math.IsNaN(want[i])) {
			t.Errorf("ratio of round %d = %v, want %v", i, got[i], want[i])
		}
	}
}
