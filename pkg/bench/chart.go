package bench

import (
	"fmt"
	"html"
	"io"
	"math"
	"strings"
)

// chartColors are the bar colours of the configurations other than TCP.
var chartColors = map[Config]string{
	Sockredir: "#2b7bb9",
	HookOnly:  "#e3a21a",
	Unix:      "#5aa75a",
}

// Chart layout, in SVG user units.
const (
	chartLabelWidth = 230
	chartPlotWidth  = 560
	chartBarHeight  = 9
	chartGroupGap   = 10
	chartTop        = 70
	chartFootHeight = 40
)

// WriteSVG draws every workload's speed relative to plain TCP as grouped
// horizontal bars (higher is better; TCP is the line at 1x), with the
// spread of the rounds as whiskers.
func (r *Report) WriteSVG(w io.Writer) error {
	var configs []Config
	for _, c := range r.Configs {
		if c != TCP {
			configs = append(configs, c)
		}
	}
	groupHeight := len(configs)*chartBarHeight + chartGroupGap
	height := chartTop + len(r.Results)*groupHeight + chartFootHeight
	width := chartLabelWidth + chartPlotWidth + 60
	scaleMax := 2.0
	for _, wr := range r.Results {
		for _, c := range wr.Configs {
			if c.Config != TCP && c.VsTCP.N > 0 {
				scaleMax = math.Max(scaleMax, c.VsTCP.Max)
			}
		}
	}
	scaleMax = math.Ceil(scaleMax*2) / 2
	x := func(ratio float64) float64 { return chartLabelWidth + ratio/scaleMax*chartPlotWidth }

	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="11">`+"\n",
		width, height, width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="10" y="20" font-size="14" font-weight="bold">sockredir bench: speed relative to plain TCP over loopback (higher is better)</text>`+"\n")
	fmt.Fprintf(&b, `<text x="10" y="38" fill="#555">Linux %s, %s, %d CPUs, %s. Medians of %d interleaved rounds; whiskers: min..max.</text>`+"\n",
		html.EscapeString(r.Machine.Kernel), html.EscapeString(r.Machine.CPU), r.Machine.CPUs, html.EscapeString(r.Machine.Date[:min(10, len(r.Machine.Date))]), r.Rounds)
	for i, c := range configs {
		lx := 10 + i*220
		fmt.Fprintf(&b, `<rect x="%d" y="48" width="12" height="10" fill="%s"/><text x="%d" y="57">%s</text>`+"\n", lx, chartColors[c], lx+16, c)
	}
	plotBottom := height - chartFootHeight
	for tick := 0.0; tick <= scaleMax+1e-9; tick += 0.5 {
		stroke, dash := "#ddd", ""
		if tick == 1 {
			stroke, dash = "#333", ` stroke-dasharray="4 3"`
		}
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s"%s/>`+"\n", x(tick), chartTop-6, x(tick), plotBottom, stroke, dash)
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle">%.1fx</text>`+"\n", x(tick), plotBottom+14, tick)
	}
	fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle" fill="#555">1x = tcp. rr: transactions/s; crr: connections/s; stream: Gbit/s at the receiver</text>`+"\n",
		x(scaleMax/2), plotBottom+30)
	for i, wr := range r.Results {
		top := chartTop + i*groupHeight
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="end">%s</text>`+"\n",
			chartLabelWidth-8, top+len(configs)*chartBarHeight/2+4, html.EscapeString(wr.Name))
		for j, cfg := range configs {
			c := wr.config(cfg)
			y := top + j*chartBarHeight
			if c == nil || c.VsTCP.N == 0 || c.failures() > 0 {
				fmt.Fprintf(&b, `<text x="%d" y="%d" fill="#b00" font-size="9">failed</text>`+"\n", chartLabelWidth+4, y+8)
				continue
			}
			v := c.VsTCP
			fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"><title>%s %s: %.2fx</title></rect>`+"\n",
				chartLabelWidth, y, x(v.Median)-chartLabelWidth, chartBarHeight-1, chartColors[cfg], html.EscapeString(wr.Name), cfg, v.Median)
			mid := float64(y) + float64(chartBarHeight-1)/2
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#222"/>`+"\n", x(v.Min), mid, x(v.Max), mid)
			fmt.Fprintf(&b, `<text x="%.1f" y="%d" font-size="9">%.2fx</text>`+"\n", math.Max(x(v.Median), x(v.Max))+4, y+8, v.Median)
		}
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}
