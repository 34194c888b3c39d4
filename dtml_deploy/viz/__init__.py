"""Pictures drawn from the same arrays the numbers come from: case previews, the HTML evaluation report,
training curves and benchmark charts. matplotlib (the optional `viz` extra) is imported only inside
these modules, and only when a picture is asked for."""
