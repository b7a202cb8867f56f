// Loaded between require.js and the ipywidgets HTML manager on pages with saved widget
// state (nb_ipywidgets_js in _config.yml). Two fixes for serving both from this site:
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
})();
