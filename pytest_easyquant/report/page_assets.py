"""The dashboard's inline stylesheet and script (no external file, font or URL)."""

STYLE = """
:root{--fail:#d1242f;--fail-bg:#ffebe9;--pass:#1a7f37;--pass-bg:#dafbe1;--miss:#9a6700;--miss-bg:#fff8c5;
--err:#8250df;--err-bg:#fbefff;--line:#d0d7de;--muted:#57606a;--head:#f6f8fa}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;color:#1f2328;background:#fff}
header.top{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid var(--line);padding:10px 24px;
display:flex;gap:16px;align-items:center;flex-wrap:wrap}
header.top h1{font-size:18px;margin:0}
.totals{color:var(--muted);margin:0}
#filter{margin-left:auto;min-width:320px;padding:6px 10px;border:1px solid var(--line);border-radius:6px;font:inherit}
main{padding:8px 24px 40px}
section.run{border:1px solid var(--line);border-radius:8px;margin:18px 0;padding:4px 18px 14px}
section.run>h2{font-size:17px;margin:12px 0 6px;display:flex;gap:10px;align-items:center;flex-wrap:wrap}
h3{font-size:15px;margin:18px 0 8px}
.chip{display:inline-block;border-radius:12px;padding:1px 9px;font-size:12px;font-weight:600;white-space:nowrap}
.chip.failed{color:var(--fail);background:var(--fail-bg)}.chip.passed{color:var(--pass);background:var(--pass-bg)}
.chip.written{color:var(--pass);background:var(--pass-bg)}.chip.missing{color:var(--miss);background:var(--miss-bg)}
.chip.error{color:var(--err);background:var(--err-bg)}
.overview{display:grid;grid-template-columns:minmax(260px,1fr) minmax(360px,2fr);gap:18px;align-items:start}
@media (max-width:900px){.overview{grid-template-columns:1fr}}
dl.config{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:0;font-size:13px}
dl.config dt{color:var(--muted)}dl.config dd{margin:0;overflow-wrap:anywhere}
table{border-collapse:collapse;margin:4px 0 8px;font-size:13px}
th,td{border-bottom:1px solid var(--line);padding:3px 8px;text-align:right;vertical-align:top}
th{background:var(--head);font-weight:600;text-align:left}
td.metric,th.metric{text-align:left;overflow-wrap:anywhere;max-width:440px}
td.note{text-align:left;white-space:pre-wrap;color:var(--muted);max-width:460px;overflow-wrap:anywhere;font-size:12px}
tr.bad td{background:var(--fail-bg)}tr.bad td.metric{font-weight:600}
tr.bad td:nth-child(4){color:var(--fail);font-weight:600}
table.headline td,table.headline th{font-size:14px}
.command{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:var(--head);border:1px solid var(--line);
border-radius:6px;padding:6px 8px;overflow-wrap:anywhere;white-space:pre-wrap;display:block;margin:4px 0}
p.missing-line{background:var(--miss-bg);border-radius:6px;padding:6px 10px}
p.error-line{background:var(--err-bg);border-radius:6px;padding:6px 10px}
.charts{display:flex;flex-wrap:wrap;gap:12px}
figure.chart-box{margin:0;border:1px solid var(--line);border-radius:6px;padding:6px;max-width:100%;overflow-x:auto}
figure.chart-box figcaption{font-weight:600;font-size:13px;margin-bottom:2px}
svg.chart{display:block;font:11px system-ui,sans-serif}
svg.chart .grid{stroke:#eaeef2}svg.chart .tick,svg.chart .label{fill:#57606a}svg.chart .legend text{fill:#1f2328}
p.chart-note{color:var(--muted);font-size:12px;margin:2px 0}
details.check{border:1px solid var(--line);border-radius:6px;margin:8px 0;padding:0 10px}
details.check>summary{cursor:pointer;padding:6px 0;display:flex;gap:10px;align-items:baseline;flex-wrap:wrap}
details.check>summary .name{font-weight:600;overflow-wrap:anywhere}
details.check>summary .what{color:var(--muted)}
details.check.failed{border-left:4px solid var(--fail)}details.check.error{border-left:4px solid var(--err)}
details.group>summary{cursor:pointer;font-weight:600;margin:10px 0}
details.more>summary{cursor:pointer;color:var(--muted);font-size:12px}
p.recorded-head{margin:6px 0 0;color:var(--muted);font-size:13px}
ul.recorded{margin:2px 0 8px;color:var(--muted);font-size:13px}
.triptych{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:10px;margin:8px 0}
.triptych figure{margin:0}.triptych figcaption{font-weight:600;font-size:12px;color:var(--muted)}
.triptych img{width:100%;height:auto;border:1px solid var(--line);cursor:zoom-in}
.triptych.zoom{grid-template-columns:1fr}.triptych.zoom img{cursor:zoom-out}
[hidden]{display:none!important}
footer{color:var(--muted);font-size:12px;padding:0 24px 24px}
"""

SCRIPT = """
(function(){
  var box = document.getElementById('filter');
  function apply(){
    var q = box.value.trim().toLowerCase();
    document.querySelectorAll('details.check').forEach(function(check){
      var nameHit = !q || check.dataset.check.toLowerCase().indexOf(q) >= 0;
      var rowHit = false;
      check.querySelectorAll('tr[data-metric]').forEach(function(tr){
        var hit = tr.dataset.metric.toLowerCase().indexOf(q) >= 0;
        rowHit = rowHit || (q && hit);
        tr.hidden = !(nameHit || hit);
      });
      check.hidden = !(nameHit || rowHit);
      if (q && !check.hidden) {
        for (var up = check; up; up = up.parentElement) { if (up.tagName === 'DETAILS') up.open = true; }
      }
    });
    document.querySelectorAll('details.group').forEach(function(group){
      group.hidden = !!q && !group.querySelector('details.check:not([hidden])');
    });
  }
  box.addEventListener('input', apply);
  document.querySelectorAll('.triptych img').forEach(function(img){
    img.addEventListener('click', function(){ img.closest('.triptych').classList.toggle('zoom'); });
  });
})();
"""
