// Loaded between require.js and the ipywidgets HTML manager on pages with saved widget
// state (nb_ipywidgets_js in _config.yml). Two fixes for serving both from this site, and
// one for screen readers:
(function () {
  // 1. The manager looks for its icon fonts next to its AMD module
  //    "@jupyter-widgets/html-manager/dist/libembed-amd", whose URL require.js would
  //    otherwise derive from the page's own folder. Point that module path at the copy
  //    book/fetch_assets.py puts under _static/offline/.
  var staticDir = document.currentScript.src;  // .../_static/widgets_offline.js
  require.config({
    paths: {
      "@jupyter-widgets/html-manager/dist": new URL("offline/html-manager", staticDir).href,
    },
  });

  // 2. ipywidgets' controls typeset widget labels with the MathJax 2 call
  //    MathJax.Hub.Queue(["Typeset", MathJax.Hub, element]) whenever window.MathJax
  //    exists, but the book runs MathJax 3, which has no Hub: a TypeError per label.
  //    Forward that call to MathJax 3. MathJax is loaded with "defer", so it exists
  //    by DOMContentLoaded; this listener is added before the manager's own.
  document.addEventListener("DOMContentLoaded", function () {
    var mj = window.MathJax;
    if (!mj || mj.Hub || !mj.typesetPromise) return;
    mj.Hub = {
      Queue: function (job) {
        var element = job[2];
        mj.startup.promise.then(function () { return mj.typesetPromise([element]); });
      },
    };
  });

  // 3. Names the manager leaves out (found by axe-core in tests/test_site.py):
  //    - a slider's handle (noUiSlider, role="slider") has no accessible name: name it by its
  //      widget's label, and let it announce the readout, since noUiSlider's own value text
  //      is FloatLogSlider's exponent (4 for alpha = 16) and SelectionSlider's option index;
  //    - a figure drawn from saved widget state has no alt: give it the alt text of its
  //      cell's metadata, which book/_ext/accessible_pages.py puts on the widget view's
  //      <script> as data-image-alt (the manager draws the view just before that script).
  var labels = 0;
  function nameWidgets() {
    document.querySelectorAll(".widget-slider").forEach(function (slider) {
      var handle = slider.querySelector(".noUi-handle[role=slider]");
      var label = slider.querySelector(".widget-label");
      if (!handle || !label || !label.textContent.trim() || handle.hasAttribute("aria-labelledby")) return;
      if (!label.id) label.id = "widget-label-" + ++labels;
      handle.setAttribute("aria-labelledby", label.id);
      var readout = slider.querySelector(".widget-readout");
      if (!readout) return;
      var follow = function () { handle.setAttribute("aria-valuetext", readout.textContent.trim()); };
      new MutationObserver(follow).observe(readout, {childList: true, characterData: true, subtree: true});
      follow();
    });
    document.querySelectorAll("script[data-image-alt]").forEach(function (view) {
      var drawn = view.previousElementSibling;
      if (!drawn) return;
      drawn.querySelectorAll("img:not([alt])").forEach(function (img) { img.alt = view.dataset.imageAlt; });
    });
  }
  new MutationObserver(nameWidgets).observe(document.documentElement, {childList: true, subtree: true});
})();
