# Grouped bars: per metric, each tool's speed relative to native (mount rows: relative
# to `tar -x` extraction), log scale, >1 = faster. Input: chart.dat written by
# scripts/compare.sh (header row of tool names; "?" = no number).
#   gnuplot -e "datafile='chart.dat'; outfile='docs/benchmarks.svg'" scripts/plot.gnuplot
if (!exists("datafile")) datafile = 'chart.dat'
if (!exists("outfile")) outfile = 'benchmarks.svg'
set terminal svg size 1100,560 dynamic font "sans,11" background rgb "white"
set output outfile
set datafile missing "?"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set logscale y 10
set yrange [0.0001:300]
set ytics ("0.0001" 0.0001, "0.001" 0.001, "0.01" 0.01, "0.1" 0.1, "1" 1, "10" 10, "100" 100)
set grid ytics
set ylabel "speed relative to native (log; >1 = faster)"
set title "snapfs vs ratarmount, archivemount, squashfuse — relative to native disk (mounts: relative to tar -x)"
set xtics norotate scale 0 font ",10"
set key top right horizontal font ",10" width -4
set arrow from graph 0, first 1 to graph 1, first 1 nohead lc rgb "black" lw 1.5
# columns: "metric" plus one quoted tool name each
ncol = 1 + int(system("head -n 1 '" . datafile . "' | awk -F'\"' '{ print (NF - 1) / 2 }'"))
plot for [c=2:ncol] datafile using c:xtic(1) title columnheader(c)
